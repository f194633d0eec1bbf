"""Grammar compilation for one model: xgrammar's view of the vocabulary, built once, and a
background thread that compiles specs so a new schema never stalls the step loop.

Compiled grammars are cached by their spec text (an LRU of futures, so concurrent requests
with the same schema wait on one compilation).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import xgrammar

from ernie_cluster.structured_output.params import GrammarSpec
from ernie_cluster.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# NOTE: the layout tags stay usable by grammars (a `<tool_call>` the model emits as one token
# must match the text "<tool_call>"), even where a tokenizer flags them special.
_LAYOUT_TAGS = frozenset({"<response>", "</response>", "<tool_call>", "</tool_call>"})
# Never allowed inside constrained text: the reasoning tags (a constraint starts after them).
_REASONING_TAGS = frozenset({"<think>", "</think>"})


def tokenizer_info(
    tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int]
) -> xgrammar.TokenizerInfo:
    """xgrammar's view of the vocabulary: token strings, with special tokens blanked so no
    grammar ever allows them as text, padded to the model's `vocab_size` rows."""
    num_tokens = tokenizer.vocab_size
    if num_tokens > vocab_size:
        raise ValueError(
            f"the tokenizer has {num_tokens} tokens but the model only {vocab_size} logits"
        )
    pieces = tokenizer.convert_ids_to_tokens(range(num_tokens))
    blanked = {i for i in tokenizer.all_special_ids if pieces[i] not in _LAYOUT_TAGS}
    blanked |= {i for i, piece in enumerate(pieces) if piece in _REASONING_TAGS}
    encoded = ["" if i in blanked or piece is None else piece for i, piece in enumerate(pieces)]
    try:
        metadata = xgrammar.TokenizerInfo._detect_metadata_from_hf(tokenizer.to_json_str())
        vocab_type, add_prefix_space = metadata["vocab_type"], metadata["add_prefix_space"]
    except Exception:  # an unusual tokenizer.json: fall back to what the vocabulary shows
        vocab_type = (
            xgrammar.VocabType.BYTE_FALLBACK if tokenizer.byte_token_ids else xgrammar.VocabType.RAW
        )
        add_prefix_space = False
    return xgrammar.TokenizerInfo(
        encoded,
        vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=sorted(set(stop_token_ids)),
        add_prefix_space=add_prefix_space,
    )


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer on a background thread, with a cache."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        cache_size: int = 256,
    ) -> None:
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.vocab_size = vocab_size
        self._compiler = xgrammar.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._cache_size = cache_size

    def submit(self, spec: GrammarSpec) -> Future:
        """A future of the compiled grammar; a spec seen before returns its cached future."""
        key = spec.structural_tag
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, key)
            self._cache[key] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return future

    def _compile(self, structural_tag: str) -> xgrammar.CompiledGrammar:
        start = time.perf_counter()
        compiled = self._compiler.compile_structural_tag(structural_tag)
        logger.debug("compiled a grammar in %.1f ms", (time.perf_counter() - start) * 1e3)
        return compiled

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
