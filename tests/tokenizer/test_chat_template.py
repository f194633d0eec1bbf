"""Chat templates: our renderer against transformers, and our demo template against the model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from ernie_cluster.tokenizer import ChatTemplateError, Tokenizer, render_chat_template
from ernie_cluster_tools.fixtures.tiny_tokenizer import CHAT_TEMPLATE_FILE

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city. Use <city> names & 中文 names.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "城市名"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "description": "Now.", "parameters": {"type": "object"}},
}


def _call(name: str, arguments: object, call_id: str = "call_0") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# (messages, tools, extra template kwargs)
CASES: dict[str, tuple[list[dict], list[dict] | None, dict]] = {
    "one_user_turn": ([{"role": "user", "content": "Hello!"}], None, {}),
    "system_and_user": (
        [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
        None,
        {},
    ),
    "system_settings_kwarg": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        None,
        {"system_settings": "date=2025-09-10"},
    ),
    "system_settings_without_system_message": (
        [{"role": "user", "content": "Hi"}],
        None,
        {"system_settings": "date=2025-09-10"},
    ),
    "multi_turn_with_and_without_reasoning": (
        [
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
            {"role": "assistant", "content": "<think>\nThey want a new one.\n</think>\n\nRed."},
            {"role": "user", "content": "And a third?"},
        ],
        None,
        {},
    ),
    "reasoning_kept_after_last_query": (
        [
            {"role": "user", "content": "Plan a trip."},
            {"role": "assistant", "content": "<think>\nFirst step.\n</think>\n\nStep one done."},
            {"role": "assistant", "content": "No reasoning here."},
            {"role": "assistant", "content": "<think>Final thoughts</think>Done."},
        ],
        None,
        {},
    ),
    "thoughts_field": (
        [
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "Because.", "thoughts": "\nshort reason\n"},
        ],
        None,
        {},
    ),
    "tools_list": (
        [{"role": "user", "content": "Weather in Paris?"}],
        [WEATHER_TOOL, TIME_TOOL],
        {},
    ),
    "tool_calls_string_and_object_arguments": (
        [
            {"role": "user", "content": "Weather in Paris and the time?"},
            {
                "role": "assistant",
                "content": "<think>I need two tools.</think>",
                "tool_calls": [
                    _call("get_weather", '{"city": "Paris"}'),
                    _call("get_time", {}, "call_1"),
                ],
            },
            {"role": "tool", "tool_call_id": "call_0", "content": '{"temp": 21, "sky": "晴"}'},
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
            {
                "role": "assistant",
                "content": "<think>Both answered.</think>\n\nIt is 21°C at noon.",
            },
            {"role": "user", "content": "Thanks"},
        ],
        [WEATHER_TOOL, TIME_TOOL],
        {},
    ),
    "tool_call_with_answer_text_and_none_content": (
        [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [_call("get_weather", {"city": "北京", "unit": "c"})],
            },
            {"role": "tool", "content": "sunny"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"name": "get_time", "arguments": {}}],
            },
            {"role": "tool", "content": "noon"},
        ],
        [WEATHER_TOOL],
        {},
    ),
    "tool_output_wrapped_user_turn": (
        [
            {"role": "user", "content": "Start."},
            {"role": "assistant", "content": "<think>go</think>ok"},
            {"role": "user", "content": "<tool_output>42</tool_output>"},
            {"role": "assistant", "content": "<think>use 42</think>The answer is 42."},
        ],
        None,
        {},
    ),
    "late_system_message": (
        [
            {"role": "user", "content": "Hi"},
            {"role": "system", "content": "Switch to French."},
            {"role": "user", "content": "Bonjour"},
        ],
        None,
        {},
    ),
    "chinese_and_emoji": (
        [
            {"role": "system", "content": "你是一个乐于助人的助手。"},
            {"role": "user", "content": "你好🙂，今天北京天气怎么样？"},
            {"role": "assistant", "content": "<think>\n用户问天气。\n</think>\n\n晴天☀️，25°C。"},
            {"role": "user", "content": "谢谢 👍🏽 — merci!"},
        ],
        None,
        {},
    ),
}


@pytest.fixture(scope="module")
def hf_reference_tokenizer(tiny_tokenizer_dir: Path, reference_template: str):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tiny_tokenizer_dir / "tokenizer.json")
    )
    hf.chat_template = reference_template
    return hf


@pytest.fixture(scope="module")
def demo_template() -> str:
    return CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_template_matches_transformers(
    case: str, add_generation_prompt: bool, reference_template: str, hf_reference_tokenizer
) -> None:
    messages, tools, kwargs = CASES[case]
    ours = render_chat_template(
        reference_template, messages, tools, add_generation_prompt=add_generation_prompt, **kwargs
    )
    theirs = hf_reference_tokenizer.apply_chat_template(
        messages,
        tools=tools,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    assert ours == theirs


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_demo_template_matches_reference(
    case: str, add_generation_prompt: bool, reference_template: str, demo_template: str
) -> None:
    messages, tools, kwargs = CASES[case]
    expected = render_chat_template(
        reference_template, messages, tools, add_generation_prompt=add_generation_prompt, **kwargs
    )
    actual = render_chat_template(
        demo_template, messages, tools, add_generation_prompt=add_generation_prompt, **kwargs
    )
    assert actual == expected


def test_demo_template_is_not_the_reference_file(reference_template: str, demo_template: str):
    assert demo_template != reference_template
    assert "{#-" in demo_template


def test_rendered_prompt_shape(demo_template: str) -> None:
    messages, tools, _ = CASES["tool_calls_string_and_object_arguments"]
    text = render_chat_template(demo_template, messages, tools)
    assert text.startswith("<|im_start|>system\n<global_setting>\nthink_mode=True\n")
    assert text.endswith("<|im_end|>\n\n<|im_start|>assistant\n<think>\n")
    tool_list = text.split("<tool_list>\n")[1].split("\n</tool_list>")[0]
    assert json.loads(tool_list) == [WEATHER_TOOL, TIME_TOOL]
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    )
    assert '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>' in text
    assert (
        '<|im_start|>tool\n<tool_output>"{\\"temp\\": 21, \\"sky\\": \\"晴\\"}"</tool_output>\n'
        '<tool_output>"12:00"</tool_output><|im_end|>' in text
    )


def test_tojson_matches_json_dumps() -> None:
    template = (
        "{{ value | tojson }}|{{ value | tojson(indent=2) }}|{{ value | tojson(sort_keys=true) }}"
        "|{{ value | tojson(separators=(',', ':')) }}|{{ value | tojson(ensure_ascii=true) }}"
    )
    value = {"z": "<b>&'中🙂", "a": [1, 2.5, None, True]}
    expected = "|".join(
        [
            json.dumps(value, ensure_ascii=False),
            json.dumps(value, ensure_ascii=False, indent=2),
            json.dumps(value, ensure_ascii=False, sort_keys=True),
            json.dumps(value, ensure_ascii=False, separators=(",", ":")),
            json.dumps(value, ensure_ascii=True),
        ]
    )
    assert render_chat_template(template, [], value=value) == expected


def test_template_helpers() -> None:
    template = (
        "{% set ns = namespace(count=0) %}{% for m in messages %}{% if m.role == 'skip' %}"
        "{% continue %}{% endif %}{% set ns.count = ns.count + 1 %}{% endfor %}"
        "{{ ns.count }} {{ strftime_now('%Y') | length }} {{ add_generation_prompt }} {{ bos_token }}"
    )
    messages = [{"role": "user"}, {"role": "skip"}, {"role": "assistant"}]
    assert render_chat_template(template, messages, bos_token="<s>") == "2 4 True <s>"


def test_raise_exception_is_a_value_error() -> None:
    template = "{{ raise_exception('only user and assistant roles are supported') }}"
    with pytest.raises(ValueError, match="only user and assistant roles are supported"):
        render_chat_template(template, [{"role": "user", "content": "x"}])


def test_render_errors_are_value_errors(demo_template: str) -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for %}", [])
    with pytest.raises(ValueError, match="rendering failed"):
        render_chat_template(demo_template, [])  # the template reads messages[0]
    with pytest.raises(ValueError, match="message 1 must be a dict"):
        render_chat_template(demo_template, [{"role": "user", "content": "x"}, "hello"])
    with pytest.raises(ValueError, match="non-empty string"):
        render_chat_template("", [])


def test_sandbox_blocks_python_internals() -> None:
    with pytest.raises(ValueError):
        render_chat_template("{{ messages.__class__.__mro__ }}", [])
    with pytest.raises(ValueError):
        render_chat_template("{% set x = [] %}{{ x.append(1) }}", [])


class _Call(BaseModel):
    name: str
    arguments: str


class _Message(BaseModel):
    role: str
    content: str | None = None
    tool_calls: list[dict[str, _Call]] | None = None


def test_pydantic_messages_and_none_fields(demo_template: str) -> None:
    as_dicts = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}],
        },
    ]
    as_models = [
        _Message(role="user", content="Weather?"),
        _Message(
            role="assistant",
            content=None,
            tool_calls=[{"function": _Call(name="get_weather", arguments='{"city": "Rome"}')}],
        ),
    ]
    assert render_chat_template(demo_template, as_models) == render_chat_template(
        demo_template, as_dicts
    )


def test_tokenizer_apply_chat_template(tiny_tokenizer: Tokenizer, demo_template: str) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert tiny_tokenizer.chat_template == demo_template
    assert tiny_tokenizer.apply_chat_template(messages) == render_chat_template(
        demo_template, messages
    )
    ids = tiny_tokenizer.encode(tiny_tokenizer.apply_chat_template(messages))
    assert ids[0] == tiny_tokenizer.token_to_id("<|im_start|>")
    assert ids[-2:] == [tiny_tokenizer.token_to_id("<think>"), tiny_tokenizer.token_to_id("<0x0A>")]


def test_tokenizer_without_template_raises(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tiny_tokenizer_dir / "tokenizer.json").read_bytes())
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize(
    ("config_value", "expected"),
    [
        ("{{ 'plain' }}", "plain"),
        (
            [
                {"name": "tool_use", "template": "{{ 'tools' }}"},
                {"name": "default", "template": "{{ 'd' }}"},
            ],
            "d",
        ),
    ],
)
def test_template_from_tokenizer_config(
    tiny_tokenizer_dir: Path, tmp_path: Path, config_value: object, expected: str
) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_tokenizer_dir / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = config_value
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == expected
    # chat_template.jinja, when present, wins over the config entry.
    (tmp_path / "chat_template.jinja").write_text("{{ 'file' }}")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([]) == "file"
