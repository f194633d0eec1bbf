"""Synthetic chat conversations for the demo model, one assistant turn to learn each.

Owns the conversation families (greetings, requests it cannot help with, weather with a
get_weather tool, answers after a tool result, weather without tools, multi-turn follow-ups,
copying) and the Thinking output format every assistant turn is written in: reasoning,
`</think>`, then a `<response>` or a `<tool_call>` block, then `<|im_end|>`. The wording comes
from phrasings.py; nothing here renders or tokenizes (see dataset.py). The "heldout" split
uses cities, names and phrasings the "train" split never does; `facts` says what a correct
answer contains so tests can check one."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ernie_cluster_tools.demo_model import lexicon, phrasings
from ernie_cluster_tools.demo_model.tool_schemas import (
    WEATHER_TOOL,
    Tool,
    tools_with_weather,
    tools_without_weather,
)

SPLITS = ("train", "heldout")
END_OF_TURN = "<|im_end|>"


@dataclass
class Example:
    """A conversation up to the assistant turn to write, and that turn's generated text."""

    family: str
    messages: list[dict[str, Any]]
    tools: list[Tool] | None
    target: str
    """What the model generates after the prompt's `<think>\\n`, through `<|im_end|>`."""
    facts: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- output format
def answer_text(reasoning: str, answer: str) -> str:
    return f"{reasoning}\n</think>\n\n<response>\n{answer}\n</response>\n{END_OF_TURN}"


def tool_call_text(reasoning: str, name: str, arguments: dict[str, Any]) -> str:
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{reasoning}\n</think>\n\n\n<tool_call>\n{call}\n</tool_call>\n{END_OF_TURN}"


def assistant_call_message(name: str, arguments: dict[str, Any], call_id: str) -> dict[str, Any]:
    """A past assistant turn as an OpenAI client sends it back: content empty, the call's
    arguments a JSON string spelled as the tool-call parser spells it."""
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {
                    "name": name,
                    "arguments": json.dumps(arguments, ensure_ascii=False),
                },
            }
        ],
    }


# ---------------------------------------------------------------------------- families
class _Maker:
    """Draws the parts of one example; the split decides which words it may use."""

    def __init__(self, split: str, rng: random.Random, name_pieces: Sequence[str]) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.rng = rng
        self._upper_pieces = [p for p in name_pieces if p[:1].isupper()]
        self._lower_pieces = [p for p in name_pieces if p.islower()]

    def city(self) -> str:
        if self.split == "heldout":
            return self.rng.choice(lexicon.HELDOUT_CITIES)
        if self.rng.random() < 0.3:
            return self.rng.choice(lexicon.train_cities())
        return self._made_up(lexicon.made_up_city)

    def name(self) -> str:
        if self.split == "heldout":
            return self.rng.choice(lexicon.HELDOUT_NAMES)
        if self.rng.random() < 0.3:
            return self.rng.choice(lexicon.train_names())
        return self._made_up(lambda rng: lexicon.made_up_word(rng, 1, 2))

    def made_up_word(self) -> str:
        return self._made_up(lambda rng: lexicon.made_up_word(rng, 1, 2))

    def _made_up(self, from_syllables: Callable[[random.Random], str]) -> str:
        """A made-up word from syllables or, half the time when pieces are known, from
        random tokenizer pieces: every piece then appears where a name is copied."""
        while True:
            if self._lower_pieces and self._upper_pieces and self.rng.random() < 0.5:
                first = self.rng.choice(self._upper_pieces)
                rest = self.rng.choices(self._lower_pieces, k=self.rng.randint(0, 2))
                word = first + "".join(rest)
            else:
                word = from_syllables(self.rng)
            if not lexicon.is_held_out(word):
                return word

    def pick(self, table: dict[str, tuple[str, ...]]) -> str:
        return self.rng.choice(table[self.split])

    def call_id(self) -> str:
        return f"call_{self.rng.getrandbits(48):012x}"

    def opening(self) -> list[dict[str, Any]]:
        """An optional system message."""
        if self.rng.random() < 0.25:
            return [{"role": "system", "content": self.rng.choice(phrasings.SYSTEM_PROMPTS)}]
        return []

    def weather_question(self, city: str) -> tuple[str, str | None]:
        """(question, unit asked for or None)."""
        question = self.pick(phrasings.WEATHER_QUESTIONS).format(city=city)
        if self.rng.random() < 0.3:
            unit = self.rng.choice(sorted(lexicon.UNITS))
            asked = self.rng.choice(lexicon.UNITS[unit][0])
            if question[-1] not in ".?!":
                question += "."
            return question + self.pick(phrasings.UNIT_REQUESTS).format(unit=asked), unit
        return question, None

    def weather_result(self, city: str, unit: str | None) -> dict[str, Any]:
        unit = unit or self.rng.choice(("celsius", "celsius", "fahrenheit"))
        low, high = (-15, 40) if unit == "celsius" else (5, 104)
        result: dict[str, Any] = {
            "location": city,
            "temperature": self.rng.randint(low, high),
            "unit": unit,
            "condition": self.rng.choice(lexicon.CONDITIONS),
        }
        if self.rng.random() < 0.3:
            result["humidity"] = self.rng.randint(10, 99)
        return result


def _call_reasoning(rng: random.Random, city: str, unit: str | None) -> str:
    base = rng.choice(
        (
            "The user wants to know the weather in {city}. I have a get_weather tool, so I "
            "will call it with location {city}",
            "The user is asking about the current weather in {city}. Let me call get_weather "
            "for {city}",
            "To answer this I need live weather data for {city}. The get_weather tool can "
            "look it up",
        )
    ).format(city=city)
    return base + (f", in {unit}." if unit else ".")


def _call_arguments(city: str, unit: str | None) -> dict[str, Any]:
    return {"location": city, "unit": unit} if unit else {"location": city}


def _result_answer(rng: random.Random, result: dict[str, Any]) -> tuple[str, str]:
    """(reasoning, answer) that state a weather result."""
    values = {
        "city": result["location"],
        "t": result["temperature"],
        "units": lexicon.UNITS[result["unit"]][1],
        "cond": result["condition"],
    }
    reasoning = rng.choice(
        (
            "The get_weather tool says it is {t} {units} and {cond} in {city}. I will tell "
            "the user.",
            "The tool result for {city}: {t} {units}, {cond}. Now I can answer.",
        )
    ).format(**values)
    answer = rng.choice(
        (
            "It is currently {t} {units} and {cond} in {city}.",
            "Right now in {city} it is {cond}, with a temperature of {t} {units}.",
            "The weather in {city} is {cond} and {t} {units}.",
        )
    ).format(**values)
    return reasoning, answer


def greeting(m: _Maker) -> Example:
    text = m.pick(phrasings.GREETINGS)
    tools = tools_with_weather(m.rng) if m.rng.random() < 0.5 else None
    answer = phrasings.greeting_answer(text, m.rng)
    reasoning = m.rng.choice(phrasings.GREETING_REASONING)
    messages = [*m.opening(), {"role": "user", "content": text}]
    return Example("greeting", messages, tools, answer_text(reasoning, answer), {"answer": answer})


def weather_call(m: _Maker) -> Example:
    city = m.city()
    question, unit = m.weather_question(city)
    tools = tools_with_weather(m.rng)
    arguments = _call_arguments(city, unit)
    target = tool_call_text(_call_reasoning(m.rng, city, unit), "get_weather", arguments)
    messages = [*m.opening(), {"role": "user", "content": question}]
    return Example("weather_call", messages, tools, target, {"arguments": arguments})


def weather_answer(m: _Maker) -> Example:
    """After the tool result: an answer that states its values."""
    city = m.city()
    question, unit = m.weather_question(city)
    result = m.weather_result(city, unit)
    call_id = m.call_id()
    messages = [
        *m.opening(),
        {"role": "user", "content": question},
        assistant_call_message("get_weather", _call_arguments(city, unit), call_id),
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
    ]
    reasoning, answer = _result_answer(m.rng, result)
    return Example(
        "weather_answer",
        messages,
        tools_with_weather(m.rng),
        answer_text(reasoning, answer),
        {"result": result},
    )


def out_of_scope(m: _Maker) -> Example:
    """A request the demo model was not trained for: an honest refusal that says what it can do."""
    request = m.pick(phrasings.OUT_OF_SCOPE)
    tools = tools_with_weather(m.rng) if m.rng.random() < 0.3 else None
    answer = m.rng.choice(phrasings.OUT_OF_SCOPE_ANSWERS)
    messages = [*m.opening(), {"role": "user", "content": request}]
    reasoning = m.rng.choice(phrasings.OUT_OF_SCOPE_REASONING)
    return Example(
        "out_of_scope", messages, tools, answer_text(reasoning, answer), {"answer": answer}
    )


def weather_without_tools(m: _Maker) -> Example:
    city = m.city()
    question, _ = m.weather_question(city)
    tools = tools_without_weather(m.rng) if m.rng.random() < 0.4 else None
    reasoning = m.rng.choice(
        (
            "The user asks about the weather in {city}, but I have no tool to look up live "
            "weather.",
            "There is no weather tool available, so I cannot check the weather in {city}.",
        )
    ).format(city=city)
    answer = m.rng.choice(
        (
            "Sorry, I can't look up the current weather in {city}: I don't have access to a "
            "weather service here. A weather website or app will have the latest forecast.",
            "I'm not able to check live weather for {city} without a weather tool. Please "
            "try a weather app for up-to-date conditions.",
        )
    ).format(city=city)
    messages = [*m.opening(), {"role": "user", "content": question}]
    return Example(
        "weather_no_tools", messages, tools, answer_text(reasoning, answer), {"city": city}
    )


def _past_weather_turns(m: _Maker, city: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A finished weather exchange: question, call, result, answer."""
    question, unit = m.weather_question(city)
    result = m.weather_result(city, unit)
    call_id = m.call_id()
    _, answer = _result_answer(m.rng, result)
    turns = [
        {"role": "user", "content": question},
        assistant_call_message("get_weather", _call_arguments(city, unit), call_id),
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
        {"role": "assistant", "content": answer},
    ]
    return turns, result


def _follow_up_call(
    m: _Maker,
    family: str,
    history: list[dict[str, Any]],
    follow: str,
    reasoning: str,
    arguments: dict[str, Any],
) -> Example:
    """A follow-up question after `history` that the model answers with a get_weather call."""
    messages = [*m.opening(), *history, {"role": "user", "content": follow}]
    return Example(
        family,
        messages,
        tools_with_weather(m.rng),
        tool_call_text(reasoning, "get_weather", arguments),
        {"arguments": arguments},
    )


def follow_up_unit(m: _Maker) -> Example:
    """'And in Fahrenheit?': a new call for the city of an earlier turn."""
    city = m.city()
    history, result = _past_weather_turns(m, city)
    unit = "fahrenheit" if result["unit"] == "celsius" else "celsius"
    asked = m.rng.choice(lexicon.UNITS[unit][0])
    follow = m.rng.choice(
        ("And in {u}?", "Can you give me that in {u}?", "What is that in {u}?", "In {u} please.")
    ).format(u=asked)
    reasoning = (
        f"The user wants the weather in {city} again, this time in {unit}. I will call "
        f"get_weather for {city} with unit {unit}."
    )
    arguments = {"location": city, "unit": unit}
    return _follow_up_call(m, "follow_up_unit", history, follow, reasoning, arguments)


def follow_up_umbrella(m: _Maker) -> Example:
    """'Should I take an umbrella?': answered from an earlier tool result."""
    city = m.city()
    history, result = _past_weather_turns(m, city)
    follow = m.rng.choice(
        ("Should I take an umbrella?", "Do I need an umbrella?", "Will I need an umbrella there?")
    )
    cond = result["condition"]
    if cond in lexicon.WET_CONDITIONS:
        reasoning = f"Earlier the tool said it is {cond} in {city}, so an umbrella is a good idea."
        answer = f"Yes, take an umbrella: it is {cond} in {city}."
    else:
        reasoning = f"Earlier the tool said it is {cond} in {city}, so no umbrella is needed."
        answer = f"No, you should not need one: it is {cond} in {city}."
    messages = [*m.opening(), *history, {"role": "user", "content": follow}]
    return Example(
        "follow_up_umbrella",
        messages,
        tools_with_weather(m.rng),
        answer_text(reasoning, answer),
        {"answer": answer},
    )


def follow_up_other_city(m: _Maker) -> Example:
    """'What about <city>?': a new call, the weather topic carried over from earlier turns."""
    first = m.city()
    history, _ = _past_weather_turns(m, first)
    city = m.city()
    follow = m.rng.choice(("And what about {c}?", "How about {c}?", "What about {c}?")).format(
        c=city
    )
    reasoning = (
        f"The user now asks about the weather in {city}. I will call get_weather for {city}."
    )
    arguments = {"location": city}
    return _follow_up_call(m, "follow_up_other_city", history, follow, reasoning, arguments)


def remember_name(m: _Maker) -> Example:
    """The user says their name, chats, then asks for it back."""
    name = m.name()
    intro = m.rng.choice(
        (
            "Hi! My name is {n}.",
            "Hello, I'm {n}.",
            "Hey, call me {n}.",
            "I am {n}, nice to meet you.",
        )
    ).format(n=name)
    messages = [
        *m.opening(),
        {"role": "user", "content": intro},
        {"role": "assistant", "content": f"Nice to meet you, {name}! How can I help you today?"},
    ]
    if m.rng.random() < 0.5:
        small_talk = m.rng.choice(phrasings.GREETINGS["train"][:8])
        messages += [
            {"role": "user", "content": small_talk},
            {"role": "assistant", "content": phrasings.greeting_answer(small_talk, m.rng)},
        ]
    question = m.rng.choice(
        ("What is my name?", "Do you remember my name?", "What did I say my name was?")
    )
    messages.append({"role": "user", "content": question})
    reasoning = f"Earlier in this conversation the user said their name is {name}."
    answer = m.rng.choice(("Your name is {n}.", "Of course! You are {n}.")).format(n=name)
    return Example("remember_name", messages, None, answer_text(reasoning, answer), {"name": name})


def repeat_word(m: _Maker) -> Example:
    """'Repeat after me': the plainest copy, which teaches the model to copy any pieces."""
    word = m.city() if m.rng.random() < 0.5 else m.name()
    request = m.rng.choice(
        ("Repeat after me: {w}", "Please say {w}.", "Can you write {w} for me?", "Echo {w}")
    ).format(w=word)
    reasoning = f"The user wants me to repeat the word {word}."
    messages = [*m.opening(), {"role": "user", "content": request}]
    return Example("repeat", messages, None, answer_text(reasoning, word), {"answer": word})


def repeat_words(m: _Maker) -> Example:
    """A line of made-up words to repeat: a copy target at almost every token, which is how a
    small model learns quickly to continue what it is copying from the prompt."""
    line = " ".join(m.made_up_word() for _ in range(m.rng.randint(4, 10)))
    request = m.rng.choice(("Repeat after me: {w}", "Copy this: {w}", "Say this back: {w}"))
    reasoning = "The user wants me to repeat a line of words."
    messages = [{"role": "user", "content": request.format(w=line)}]
    return Example("repeat_words", messages, None, answer_text(reasoning, line), {"answer": line})


FAMILIES: dict[str, tuple[Callable[[_Maker], Example], float]] = {
    "greeting": (greeting, 0.13),
    "out_of_scope": (out_of_scope, 0.05),
    "weather_call": (weather_call, 0.3),
    "weather_answer": (weather_answer, 0.2),
    "weather_no_tools": (weather_without_tools, 0.1),
    "follow_up_unit": (follow_up_unit, 0.07),
    "follow_up_umbrella": (follow_up_umbrella, 0.05),
    "follow_up_other_city": (follow_up_other_city, 0.07),
    "remember_name": (remember_name, 0.08),
    "repeat": (repeat_word, 0.08),
    "repeat_words": (repeat_words, 0.05),
}


def generate_examples(
    num_examples: int,
    seed: int,
    split: str = "train",
    families: tuple[str, ...] | None = None,
    name_pieces: Sequence[str] = (),
) -> list[Example]:
    """`num_examples` conversations drawn by family weight; the same arguments give the same list.

    `name_pieces` (letter-only tokenizer pieces) let made-up training names use every piece.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    chosen = families or tuple(FAMILIES)
    unknown = set(chosen) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; choose from {sorted(FAMILIES)}")
    rng = random.Random(f"{split}-{seed}")
    maker = _Maker(split, rng, name_pieces)
    makers = [FAMILIES[name][0] for name in chosen]
    weights = [FAMILIES[name][1] for name in chosen]
    return [rng.choices(makers, weights)[0](maker) for _ in range(num_examples)]


def weather_tool() -> Tool:
    """The get_weather definition the README and the tests send."""
    return json.loads(json.dumps(WEATHER_TOOL))
