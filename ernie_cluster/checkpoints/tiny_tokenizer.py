"""A small SentencePiece-style BPE tokenizer for the generated demo and test checkpoints.

Owns the synthetic training corpus, the vocabulary layout (ERNIE's control tokens at fixed low
ids, then the 256 byte-fallback tokens, then learned pieces) and the Hugging Face tokenizer
files. Deterministic: the same vocab_size gives byte-identical files. It never downloads
anything; the real model's tokenizer is not needed.
"""

from __future__ import annotations

import json
import random
import string
from collections import Counter
from pathlib import Path

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

# (content, special). Special tokens are skipped by decode(skip_special_tokens=True); the
# think/response/tool_call tags are plain added tokens because the reasoning and tool-call
# parsers must see them in decoded text.
CONTROL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<unk>", True),
    ("<s>", True),
    ("</s>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<response>", False),
    ("</response>", False),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|begin_of_sentence|>", True),
    ("<|end_of_sentence|>", True),
)
BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{b:02X}>" for b in range(256))
METASPACE = "▁"
MODEL_MAX_LENGTH = 131072
CHAT_TEMPLATE_FILE = Path(__file__).with_name("chat_template.jinja")

_SEED = 20250910
# Printable ASCII and the metaspace always get their own piece; everything else (most Chinese
# characters, emoji, newline) may fall back to byte tokens, as in the real model.
_BASE_ALPHABET = [*sorted(set(string.printable) - set(string.whitespace)), METASPACE]
_MIN_VOCAB_SIZE = len(CONTROL_TOKENS) + len(BYTE_TOKENS) + len(_BASE_ALPHABET)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_ENGLISH = _words("""
the be to of and a in that have it for not on with he as you do at this but his by from they we
say her she or an will my one all would there their what so up out if about who get which go me
when make can like time no just him know take people into year your good some could them see
other than then now look only come its over think also back after use two how our work first
well way even new want because any these give day most us is are was were been has had did
model token answer question reason step result value number list table city weather today
tomorrow rain sun cloud wind temperature degree river mountain ocean forest garden kitchen
library school student teacher doctor engineer server cluster request response stream batch
memory cache block layer expert router attention prompt output input system user assistant
function argument parameter string integer boolean object array error message file path
python code test data train serve deploy scale fast slow large small simple careful quickly
compute matrix vector tensor gradient kernel device network latency throughput queue worker
please thank hello world example sentence paragraph story history science music language
because however therefore although while before during between through without within
""")

_CHINESE = _words("""
你好 世界 谢谢 请问 今天 明天 天气 北京 上海 中国 我们 你们 他们 问题 答案 模型 服务 请求
响应 文本 数据 计算 学习 时间 城市 温度 下雨 晴天 朋友 学生 老师 工作 生活 知识 语言 翻译
思考 推理 工具 函数 参数 结果 系统 用户 助手 内容 可以 需要 因为 所以 但是 如果 然后 已经
非常 一个 这个 那个 什么 怎么 为什么 没有 知道 觉得 喜欢 开始 结束 东西 地方 方法 简单
重要 技术 科学 历史 音乐 电脑 手机 网络 文件 程序 代码 测试 部署 集群 专家 路由 注意力
""")

_IDENTIFIERS = _words("""
get set load save read write parse build make run start stop send fetch update delete create
user name city weather config model token request response value result item index count size
path file data cache block layer expert batch queue state step
""")

_CODE_TEMPLATES = (
    "def {a}_{b}({c}, {d}=None):",
    "    return {c}.{a}_{b}({d})",
    "    if {c} is None:",
    "        raise ValueError(f'{a} {b} must be set, got {{{c}!r}}')",
    "    for {c} in range({n}):",
    "        {d} = {d} + {c} * {n}",
    "import {a}",
    "from {a}.{b} import {c}_{d}",
    "class {A}{B}:",
    "    def __init__(self, {c}: int = {n}) -> None:",
    "        self.{c} = {c}",
    "{c}_{d} = [{n}, {m}, {n} + {m}]",
    "print(f'{{{c}}} {b} {{{d}}}')",
    "# {a} the {b} before we {c} the {d}",
)

_CHAT_TEMPLATES = (
    "<global_setting>",
    "think_mode=True",
    "</global_setting>",
    "<system_setting>",
    "</system_setting>",
    "<tool_list>",
    "</tool_list>",
    "<tool_output>{q}{e} {f}{q}</tool_output>",
    "user",
    "assistant",
    "system",
    "tool",
    '{{"name": "{a}_{b}", "arguments": {{"{c}": "{e}", "{d}": {n}}}}}',
    '{{"type": "function", "function": {{"name": "{a}_{b}", "description": "{E} the {f}.", '
    '"parameters": {{"type": "object", "properties": {{"{c}": {{"type": "string"}}}}, '
    '"required": ["{c}"]}}}}}}',
    "Let me think about the {e} {f} step by step.",
    "The user asks about the {e} in {f}, so I should call the {a}_{b} tool.",
)


def build_tiny_tokenizer(vocab_size: int) -> Tokenizer:
    """Train the demo tokenizer; its vocabulary never exceeds `vocab_size` entries."""
    num_fixed = len(CONTROL_TOKENS) + len(BYTE_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {_MIN_VOCAB_SIZE} ({len(CONTROL_TOKENS)} control "
            f"tokens, {len(BYTE_TOKENS)} byte tokens and {len(_BASE_ALPHABET)} base characters), "
            f"got {vocab_size!r}"
        )
    pieces, merges = _train_pieces(vocab_size - num_fixed)
    # NOTE: like ERNIE's own tokenizer (add_prefix_space=False) there is no dummy-prefix
    # metaspace, so the decoder has no leading-space Strip and decode(encode(text)) == text.
    # Splitting at metaspaces gives the same pieces as not splitting (no merge crosses a word
    # start) but keeps BPE work per word.
    return assemble_bpe(pieces, merges, pre_tokenizer=_metaspace())


def assemble_bpe(
    pieces: list[str],
    merges: list[tuple[str, str]],
    pre_tokenizer: pre_tokenizers.PreTokenizer,
    normalizer: normalizers.Normalizer | None = None,
) -> Tokenizer:
    """A byte-fallback BPE with ERNIE's id layout: the control tokens (added tokens, at their
    fixed low ids), the 256 byte tokens, then `pieces`; it decodes metaspaces to spaces."""
    vocab = {content: i for i, (content, _) in enumerate(CONTROL_TOKENS)}
    for token in (*BYTE_TOKENS, *pieces):
        if token in vocab:
            raise RuntimeError(f"learned piece {token!r} collides with a reserved token")
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(METASPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.add_tokens([_added_token(content, special) for content, special in CONTROL_TOKENS])
    return tokenizer


def write_tokenizer_files(directory: str | Path, vocab_size: int) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and the template."""
    write_tokenizer_dir(
        directory, build_tiny_tokenizer(vocab_size), CHAT_TEMPLATE_FILE.read_text("utf-8")
    )


def write_tokenizer_dir(directory: str | Path, tokenizer: Tokenizer, chat_template: str) -> None:
    """`tokenizer` as a Hugging Face tokenizer directory with ERNIE's special-token roles."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", "utf-8")
    _write_json(directory / "tokenizer_config.json", _tokenizer_config())
    _write_json(directory / "special_tokens_map.json", _special_tokens_map())
    (directory / "chat_template.jinja").write_text(chat_template, "utf-8")


def training_corpus(seed: int = _SEED) -> list[str]:
    """Lines of English, Chinese, Python and chat-format text; a fixed seed makes it repeatable."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(2500):
        words = [rng.choice(_ENGLISH) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2025)))
        if rng.random() < 0.25:
            words[rng.randrange(len(words))] += ","
        lines.append(" ".join(words) + rng.choice(".?!:"))
    for _ in range(1200):
        phrase = "".join(rng.choice(_CHINESE) for _ in range(rng.randint(2, 8)))
        lines.append(phrase + rng.choice(("。", "？", "！", "，", "：")))
    for _ in range(2500):
        fields = _template_fields(rng)
        lines.append(rng.choice(_CODE_TEMPLATES).format(**fields))
        lines.append(rng.choice(_CHAT_TEMPLATES).format(**fields))
    return lines


def _train_pieces(max_pieces: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Learned BPE pieces (alphabet first, in trainer order) and merges, at most max_pieces."""
    corpus = training_corpus()
    alphabet = _alphabet(corpus, max_pieces)
    trainer = trainers.BpeTrainer(
        vocab_size=max_pieces,
        min_frequency=2,
        show_progress=False,
        # NOTE: the trainer breaks frequency ties at its alphabet cut-off in hash order, so
        # the alphabet is chosen here and the limit only drops characters outside it.
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
    )
    scratch = Tokenizer(models.BPE(unk_token=None))
    # NOTE: no training line holds a newline, so newline is never learned and always encodes
    # as the byte token <0x0A>, as in the real model.
    scratch.pre_tokenizer = _metaspace()
    scratch.train_from_iterator(corpus, trainer=trainer)
    return trained_pieces(scratch, max_pieces)


def trained_pieces(scratch: Tokenizer, max_pieces: int) -> tuple[list[str], list[tuple[str, str]]]:
    """The pieces (in id order) and merges a BPE trainer gave `scratch`, for assemble_bpe."""
    model = json.loads(scratch.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].__getitem__)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    if len(pieces) > max_pieces:
        raise RuntimeError(f"BPE trainer produced {len(pieces)} pieces, limit {max_pieces}")
    return pieces, merges


def _alphabet(corpus: list[str], max_pieces: int) -> list[str]:
    """Printable ASCII and the metaspace, then the most frequent other characters.

    A quarter of the room beyond ASCII goes to single characters (mostly Chinese), the rest to
    merges; characters left out are encoded as byte tokens.
    """
    counts = Counter("".join(corpus).replace(" ", METASPACE))
    others = sorted((c for c in counts if c not in _BASE_ALPHABET), key=lambda c: (-counts[c], c))
    return _BASE_ALPHABET + others[: (max_pieces - len(_BASE_ALPHABET)) // 4]


def _metaspace() -> pre_tokenizers.Metaspace:
    return pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="never", split=True)


def _template_fields(rng: random.Random) -> dict[str, object]:
    a, b, c, d = (rng.choice(_IDENTIFIERS) for _ in range(4))
    e, f = rng.choice(_ENGLISH), rng.choice((*_CHINESE, *_ENGLISH))
    return {
        "a": a,
        "b": b,
        "c": c,
        "d": d,
        "A": a.capitalize(),
        "B": b.capitalize(),
        "E": e.capitalize(),
        "e": e,
        "f": f,
        "n": rng.randint(0, 512),
        "m": rng.randint(0, 64),
        "q": rng.choice(('"', "")),
    }


def _added_token(content: str, special: bool) -> AddedToken:
    return AddedToken(
        content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special
    )


def _added_token_dict(content: str, special: bool | None = None) -> dict[str, object]:
    entry: dict[str, object] = {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }
    if special is not None:
        entry["special"] = special
    return entry


def _tokenizer_config() -> dict[str, object]:
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): _added_token_dict(content, special)
            for i, (content, special) in enumerate(CONTROL_TOKENS)
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "cls_token": "<|begin_of_sentence|>",
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<unk>",
        "padding_side": "left",
        "sep_token": "<|end_of_sentence|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }


def _special_tokens_map() -> dict[str, object]:
    return {
        "bos_token": _added_token_dict("<s>"),
        "cls_token": _added_token_dict("<|begin_of_sentence|>"),
        "eos_token": _added_token_dict("</s>"),
        "pad_token": _added_token_dict("<unk>"),
        "sep_token": _added_token_dict("<|end_of_sentence|>"),
        "unk_token": _added_token_dict("<unk>"),
    }


def _write_json(path: Path, value: dict[str, object]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", "utf-8")
