"""Streaming detokenization: deltas add up to decode(output ids) and never split a character."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, pre_tokenizers

from ernie_cluster.tokenizer import IncrementalDetokenizer, Tokenizer
from ernie_cluster.tokenizer.detokenizer import MAX_HELD_BYTE_RUN
from ernie_cluster_tools.fixtures.tiny_tokenizer import build_tiny_tokenizer

TEXTS = [
    "你好，世界！今天北京的天气怎么样？",
    "🙂👍🏽🇨🇳 emoji 👨‍👩‍👧 family 🎉",
    "Hello world.\nSecond line\n\n  indented 两个字 and 🙂 mixed\n",
    "<think>\nThe user greets me 你好.\n</think>\n\n<response>\nHi 🙂!\n</response>\n<|im_end|>",
    "<|im_start|>assistant\n<think>\n</think>\n\n\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n</s>',
    " leading space, then <|im_end|> world after a special token<|im_start|> and more",
    "<|im_end|><|im_end|> starts with specials",
    "ends with an emoji 😀",
    "ℝ∑∫ math ∀x∈ℕ and 한국어 and русский",
]


def _stream(detok: IncrementalDetokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    deltas, i = [], 0
    for size in sizes:
        deltas.append(detok.add_tokens(ids[i : i + size]))
        i += size
    assert i >= len(ids)
    deltas.append(detok.flush())
    return deltas


def _check(
    tokenizer: Tokenizer,
    ids: list[int],
    skip: bool,
    sizes: list[int] | None = None,
    prompt: list[int] | None = None,
) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt, skip_special_tokens=skip)
    deltas = _stream(detok, ids, sizes or [1] * len(ids))
    expected = tokenizer.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == expected
    assert detok.text == expected
    return deltas


@pytest.fixture(params=["tiny", "mini"])
def tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tokenizer")


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time(tokenizer: Tokenizer, text: str, skip: bool) -> None:
    ids = tokenizer.encode(text)
    deltas = _check(tokenizer, ids, skip)
    assert not any("\ufffd" in delta for delta in deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_prompt_prefix_does_not_change_output(tokenizer: Tokenizer, skip: bool) -> None:
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "你好"}]))
    for text in TEXTS:
        ids = tokenizer.encode(text)
        deltas = _check(tokenizer, ids, skip, prompt=prompt)
        assert not any("\ufffd" in delta for delta in deltas)


def test_random_chunk_sizes(tokenizer: Tokenizer) -> None:
    rng = random.Random(7)
    ids = tokenizer.encode("".join(TEXTS))
    for _ in range(20):
        sizes = [rng.randint(0, 5) for _ in range(len(ids))]
        _check(tokenizer, ids, skip=rng.random() < 0.5, sizes=sizes)


def test_random_valid_outputs_with_specials_and_padding_ids(tokenizer: Tokenizer) -> None:
    """Model-like outputs: text pieces, control tokens anywhere, ids past the vocabulary."""
    rng = random.Random(11)
    pieces = [tokenizer.encode(text) for text in TEXTS]
    control_ids = list(range(13))
    for _ in range(60):
        ids: list[int] = []
        for _ in range(rng.randint(1, 6)):
            ids.extend(rng.choice(pieces)[: rng.randint(1, 30)])
            if rng.random() < 0.5:
                ids.append(rng.choice(control_ids))
            if rng.random() < 0.2:
                ids.append(tokenizer.vocab_size + rng.randint(0, 50))
        for skip in (True, False):
            # Cutting a piece may leave a character's bytes incomplete: those are U+FFFD in
            # decode() too, so only equality is checked here.
            _check(tokenizer, ids, skip)


def test_byte_runs_are_released_whole(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("ok🙂!")
    emoji = ids[-5:-1]
    assert tiny_tokenizer.convert_ids_to_tokens(emoji) == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    detok = IncrementalDetokenizer(tiny_tokenizer)
    assert detok.add_tokens(ids[:-5]) == "ok"
    # A later invalid byte would turn the whole run into U+FFFD in decode(), so the run
    # waits for a token that ends it; skipped special tokens do not end it.
    assert [detok.add_tokens([i]) for i in emoji] == ["", "", "", ""]
    assert detok.add_tokens([tiny_tokenizer.token_to_id("<|im_end|>")]) == ""
    assert detok.add_tokens(ids[-1:]) == "🙂!"
    assert detok.flush() == ""


def test_flush_releases_a_cut_character(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("ok🙂")
    detok = IncrementalDetokenizer(tiny_tokenizer)
    assert detok.add_tokens(ids[:-1]) == "ok"
    assert detok.flush() == tiny_tokenizer.decode(ids[-4:-1]) == "\ufffd" * 3
    assert detok.flush() == ""
    assert detok.text == tiny_tokenizer.decode(ids[:-1])


def test_invalid_bytes_match_decode(tiny_tokenizer: Tokenizer) -> None:
    byte = {b: tiny_tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    nihao = [byte[b] for b in "你".encode()]
    outputs = [
        [*nihao, byte[0xE4], *tiny_tokenizer.encode("a")],  # valid char, then a cut one
        [byte[0xBD], *nihao, *nihao],  # a stray continuation byte spoils the whole run
        [*nihao, tiny_tokenizer.token_to_id("<|im_end|>"), byte[0x80], *nihao],
    ]
    for ids in outputs:
        for skip in (True, False):
            _check(tiny_tokenizer, ids, skip)
    # A run too long to hold is released anyway: streaming must stay bounded.
    detok = IncrementalDetokenizer(tiny_tokenizer)
    deltas = [detok.add_tokens([byte[0xE4]]) for _ in range(MAX_HELD_BYTE_RUN + 1)]
    assert deltas[:-1] == [""] * MAX_HELD_BYTE_RUN
    assert deltas[-1] == "\ufffd" * (MAX_HELD_BYTE_RUN + 1)


def test_rejects_bad_ids(tiny_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        IncrementalDetokenizer(tiny_tokenizer).add_tokens([3, -2])


class _CountingTokenizer(Tokenizer):
    def __init__(self, base: Tokenizer) -> None:
        self.__dict__.update(base.__dict__)
        self.decoded_lengths: list[int] = []

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.decoded_lengths.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def _max_decode_window(tokenizer: Tokenizer, ids: list[int]) -> int:
    counting = _CountingTokenizer(tokenizer)
    _check(counting, ids, skip=True)
    return max(counting.decoded_lengths[:-1])  # the last decode() is the check's own


def test_each_step_decodes_a_bounded_window(mini_tokenizer: Tokenizer) -> None:
    text = "".join(TEXTS)
    short, long = mini_tokenizer.encode(text * 2), mini_tokenizer.encode(text * 20)
    assert len(long) > 2000
    assert _max_decode_window(mini_tokenizer, long) == _max_decode_window(mini_tokenizer, short)
    # The longest window is the longest byte run (the emoji of TEXTS[1]) plus the anchor.
    assert _max_decode_window(mini_tokenizer, long) <= 32


def test_random_model_outputs(tiny_tokenizer: Tokenizer) -> None:
    """Uniformly random ids, as a random-weight checkpoint emits: half are byte tokens."""
    rng = random.Random(3)
    for _ in range(100):
        ids = [rng.randrange(tiny_tokenizer.vocab_size + 8) for _ in range(rng.randint(1, 80))]
        sizes = [rng.randint(1, 4) for _ in ids]
        for skip in (True, False):
            _check(tiny_tokenizer, ids, skip, sizes=sizes)


def _llama_style(base: BackendTokenizer) -> Tokenizer:
    """The same vocabulary with a SentencePiece dummy prefix that decode() strips again."""
    backend = BackendTokenizer.from_str(base.to_str())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return Tokenizer(backend, special_tokens={"bos": "<s>", "eos": "</s>"})


@pytest.mark.parametrize("skip", [True, False])
def test_leading_space_strip_of_sentencepiece_decoders(skip: bool) -> None:
    tokenizer = _llama_style(build_tiny_tokenizer(32000))
    space = tokenizer.token_to_id("▁")
    world = tokenizer.encode("a world")[1:]
    assert tokenizer.convert_ids_to_tokens(world) == ["▁world"]
    im_end, think = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<think>")
    outputs = [
        tokenizer.encode("Hello world"),  # starts with the dummy-prefix "▁Hello"
        world + world,  # decode() strips the first space only
        [im_end, *world, im_end, *world],  # spaces after skipped special tokens
        [im_end, im_end, *world, *world],
        [space, *world],  # the stripped space is a token of its own
        [space, space, *world],
        [think, *world, im_end],
        tokenizer.encode(" 你好 🙂 world"),
    ]
    for ids in outputs:
        _check(tokenizer, ids, skip)
        _check(tokenizer, ids, skip, prompt=tokenizer.encode("The answer is"))
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    assert [detok.add_tokens([i]) for i in [im_end, *world, im_end, *world]] == [
        "",
        "world",
        "",
        " world",
    ]
