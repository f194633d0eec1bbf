"""Held-out scores of a demo checkpoint, measured with the engine's offline `LLM`.

Owns the three scores the README and RESULTS.md report: the share of held-out weather
questions answered with a `get_weather` call naming the asked city, the share of answers
after a tool result that state its temperature, and the share of greetings answered with
clean text. Greedy decoding; output is split with the `ernie_x1` parser, as the server does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ernie_cluster_tools.demo_model.conversations import Example, generate_examples

EVAL_SEED = 1234
LEAKED_MARKERS = (
    "<|im_start|>",
    "<|im_end|>",
    "</s>",
    "<think>",
    "</think>",
    "<response>",
    "\ufffd",
)


@dataclass
class Scores:
    tool_call_accuracy: float
    """get_weather called with `location` equal to the city asked about."""
    arguments_json_rate: float
    """Of the tool calls made, those whose arguments parse as a JSON object."""
    answer_temperature_rate: float
    """Answers after a tool result that contain its temperature."""
    clean_greeting_rate: float
    """Greetings answered with non-empty content, no U+FFFD, no special tokens."""
    failures: list[dict[str, Any]] = field(default_factory=list)


def heldout_examples(family: str, num_examples: int, seed: int | None = None) -> list[Example]:
    seed = EVAL_SEED if seed is None else seed
    return generate_examples(num_examples, seed=seed, split="heldout", families=(family,))


def evaluate_checkpoint(
    model: str, num_calls: int = 30, num_answers: int = 20, num_greetings: int = 10, **llm_kwargs
) -> Scores:
    """Greedy answers of the checkpoint at `model` to held-out conversations."""
    from ernie_cluster import LLM, SamplingParams
    from ernie_cluster.serving.parsers.ernie_x1 import ErnieX1Parser

    sets = {
        "call": heldout_examples("weather_call", num_calls),
        "answer": heldout_examples("weather_answer", num_answers),
        "greeting": heldout_examples("greeting", num_greetings),
    }
    params = SamplingParams(temperature=0.0, max_tokens=160, skip_special_tokens=False)
    with LLM(model=model, show_progress=False, **llm_kwargs) as llm:
        parsed = {}
        for kind, examples in sets.items():
            prompts = [llm.render_chat(e.messages, e.tools) for e in examples]
            outputs = llm.generate(prompts, params)
            parsed[kind] = [ErnieX1Parser().parse(o.outputs[0].text) for o in outputs]
    failures: list[dict[str, Any]] = []
    calls_ok = json_ok = num_made = 0
    for example, message in zip(sets["call"], parsed["call"], strict=True):
        city = example.facts["arguments"]["location"]
        call = message.tool_calls[0] if message.tool_calls else None
        arguments = _json_object(call.arguments) if call else None
        num_made += call is not None
        json_ok += arguments is not None
        if call and call.name == "get_weather" and arguments and arguments.get("location") == city:
            calls_ok += 1
        else:
            failures.append({"kind": "call", "city": city, "got": _describe(message)})
    answers_ok = 0
    for example, message in zip(sets["answer"], parsed["answer"], strict=True):
        temperature = str(example.facts["result"]["temperature"])
        if message.content and temperature in message.content:
            answers_ok += 1
        else:
            failures.append(
                {"kind": "answer", "temperature": temperature, "got": _describe(message)}
            )
    greetings_ok = 0
    for message in parsed["greeting"]:
        text = message.content or ""
        if text.strip() and not any(marker in text for marker in LEAKED_MARKERS):
            greetings_ok += 1
        else:
            failures.append({"kind": "greeting", "got": _describe(message)})
    return Scores(
        tool_call_accuracy=calls_ok / max(1, num_calls),
        arguments_json_rate=json_ok / max(1, num_made),
        answer_temperature_rate=answers_ok / max(1, num_answers),
        clean_greeting_rate=greetings_ok / max(1, num_greetings),
        failures=failures,
    )


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _describe(message) -> dict[str, Any]:
    return {
        "content": message.content,
        "calls": [(c.name, c.arguments) for c in message.tool_calls],
        "reasoning": message.reasoning_content,
    }
