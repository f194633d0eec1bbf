"""The demo conversation generator: the Thinking format, the held-out split, determinism.

Targets are checked with plain string and JSON parsing, not with the project's parser."""

from __future__ import annotations

import json
import re

import pytest

from ernie_cluster_tools.demo_model import lexicon
from ernie_cluster_tools.demo_model.conversations import FAMILIES, generate_examples
from ernie_cluster_tools.demo_model.dataset import render_prompt
from ernie_cluster_tools.demo_model.pipeline import chat_template

CALL_FORMAT = re.compile(
    r"^(?P<reasoning>[^<]+)\n</think>\n\n\n<tool_call>\n(?P<call>\{.*\})\n</tool_call>\n<\|im_end\|>$",
    re.S,
)
ANSWER_FORMAT = re.compile(
    r"^(?P<reasoning>[^<]+)\n</think>\n\n<response>\n(?P<answer>[^<]+)\n</response>\n<\|im_end\|>$"
)


@pytest.fixture(scope="module")
def train_examples():
    return generate_examples(1500, seed=5)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_family_writes_the_thinking_format(split):
    for family in FAMILIES:
        for example in generate_examples(20, seed=3, split=split, families=(family,)):
            call = CALL_FORMAT.match(example.target)
            answer = ANSWER_FORMAT.match(example.target)
            assert call or answer, (family, example.target)
            if call:
                parsed = json.loads(call["call"])
                assert parsed == {"name": "get_weather", "arguments": example.facts["arguments"]}
                assert example.tools and "get_weather" in [
                    t["function"]["name"] for t in example.tools
                ]


def test_weather_calls_copy_the_city_and_the_unit_asked_for():
    examples = generate_examples(300, seed=4, families=("weather_call",))
    with_unit = 0
    for example in examples:
        question = example.messages[-1]["content"]
        arguments = example.facts["arguments"]
        assert arguments["location"] in question
        if "unit" in arguments:
            with_unit += 1
            unit_words = lexicon.UNITS[arguments["unit"]][0]
            assert any(word in question for word in unit_words), question
        else:
            assert not re.search(r"celsius|fahrenheit|metric|imperial", question, re.I), question
    assert 30 < with_unit < 150


def test_answers_after_a_tool_result_state_its_values():
    for example in generate_examples(100, seed=6, families=("weather_answer",)):
        result = example.facts["result"]
        assert example.messages[-1]["role"] == "tool"
        assert json.loads(example.messages[-1]["content"]) == result
        answer = ANSWER_FORMAT.match(example.target)["answer"]
        assert str(result["temperature"]) in answer and result["condition"] in answer


def test_without_a_weather_tool_the_model_declines():
    for example in generate_examples(50, seed=7, families=("weather_no_tools",)):
        names = [t["function"]["name"] for t in example.tools or []]
        assert "get_weather" not in names
        assert "<tool_call>" not in example.target


def test_heldout_words_never_appear_in_training_conversations(train_examples):
    template = chat_template()
    held = [*lexicon.HELDOUT_CITIES, *lexicon.HELDOUT_NAMES]
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, held)) + r")\b")
    for example in train_examples:
        found = pattern.search(render_prompt(template, example) + example.target)
        assert found is None, (found, example.family)
    assert not set(lexicon.train_cities()) & set(lexicon.HELDOUT_CITIES)


def test_heldout_split_uses_heldout_cities_and_phrasings(train_examples):
    train_questions = {
        e.messages[-1]["content"].replace(e.facts["arguments"]["location"], "{city}")
        for e in train_examples
        if e.family == "weather_call"
    }
    for example in generate_examples(40, seed=8, split="heldout", families=("weather_call",)):
        city = example.facts["arguments"]["location"]
        assert city in lexicon.HELDOUT_CITIES
        assert example.messages[-1]["content"].replace(city, "{city}") not in train_questions


def test_generation_is_deterministic_and_families_are_mixed(train_examples):
    again = generate_examples(1500, seed=5)
    assert [e.target for e in again] == [e.target for e in train_examples]
    counts = {family: 0 for family in FAMILIES}
    for example in train_examples:
        counts[example.family] += 1
    assert all(count > 30 for count in counts.values()), counts


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="split"):
        generate_examples(1, seed=0, split="test")
    with pytest.raises(ValueError, match="families"):
        generate_examples(1, seed=0, families=("poetry",))
    with pytest.raises(ValueError, match="-1"):
        generate_examples(-1, seed=0)
