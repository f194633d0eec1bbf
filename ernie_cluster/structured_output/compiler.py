"""Grammar compilation for one model: xgrammar's view of the vocabulary, built once, and a
small pool of threads that compile specs so a new schema never stalls the step loop.

Every compile is bounded: at most `max_pending` wait to start (a new one beyond that is
refused at once), one nobody waits for any more is cancelled before it starts, and a request
never waits more than `timeout_s` for its grammar (errors below). Compiled grammars are cached
by spec text in an LRU bounded by bytes; requests with the same spec share one compilation.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ernie_cluster.structured_output.json_whitespace import with_json_whitespace
from ernie_cluster.structured_output.params import GrammarSpec
from ernie_cluster.tokenizer import Tokenizer

if TYPE_CHECKING:
    import xgrammar

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
    import xgrammar  # NOTE: here, where grammars are compiled: it pulls in torch

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


# ------------------------------------------------------------------------------- errors
class GrammarError(Exception):
    """A request's output constraint cannot be used; `http_status` is the answer to give."""

    http_status = 400


class GrammarCompileError(GrammarError, ValueError):
    """xgrammar refused the constraint (HTTP 400)."""


class GrammarTimeoutError(GrammarError, ValueError):
    """The constraint's compile ran past the timeout: too complex (HTTP 400)."""


class GrammarBusyError(GrammarError, RuntimeError):
    """The compile pool cannot take or finish this constraint now: retry later (HTTP 503)."""

    http_status = 503

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# -------------------------------------------------------------------------------- pool
@dataclass(frozen=True)
class CompileLimits:
    """How much grammar compilation one engine may do (EngineConfig's grammar_* fields), and
    its rule for whitespace in JSON."""

    threads: int
    """Compiles running at once (each on its own thread, off the step loop)."""
    timeout_s: float
    """Longest a request waits for its grammar; a compile running longer is refused as too
    complex."""
    max_pending: int
    """Compiles waiting for a thread; a new spec beyond this is refused at once."""
    cache_bytes: int
    """Budget of the compiled-grammar cache (spec text + xgrammar's memory_size_bytes)."""
    json_any_whitespace: bool = False
    """Free (bounded) whitespace in constrained JSON; False: compact JSON (json_whitespace)."""

    @classmethod
    def from_config(cls, config: Any) -> CompileLimits:
        """From an EngineConfig's grammar_* fields."""
        return cls(
            threads=config.grammar_compile_threads,
            timeout_s=config.grammar_compile_timeout_s,
            max_pending=config.grammar_max_pending_compiles,
            cache_bytes=config.grammar_cache_bytes,
            json_any_whitespace=config.structured_outputs_any_whitespace,
        )


class CompileJob:
    """One spec's compilation, shared by every sequence that asked for it (a cache entry)."""

    def __init__(self, key: str, compiler: GrammarCompiler) -> None:
        self.key = key
        self.future: Future[xgrammar.CompiledGrammar] = Future()
        self.started_at: float | None = None
        self.overran = False
        """It ran past the timeout: its waiters were refused, its result will not be kept."""
        self.nbytes = len(key)
        self._waiters = 0
        self._compiler = compiler

    def release(self) -> None:
        """One waiter is gone (its request ended); the last one cancels a queued compile."""
        self._compiler._release(self)

    def failure(self, waited_s: float) -> GrammarError | None:
        """Why a waiter that has waited `waited_s` can no longer get this grammar, if so."""
        future, timeout = self.future, self._compiler.limits.timeout_s
        if future.cancelled():
            return self._compiler.busy_error("the grammar compiler is shut down")
        if future.done():
            return future.exception()  # type: ignore[return-value]  # always a GrammarError
        if self.overran or self._compiler._ran_past_timeout(self):
            return self._compiler.timeout_error()
        if waited_s > timeout:
            return self._compiler.busy_error(
                f"the output constraint did not compile within {timeout:g} s because the "
                "grammar compiler is busy with other requests"
            )
        return None


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer on a bounded pool of threads, with a cache.

    NOTE: a running xgrammar compile cannot be interrupted (nor cancelled once started: with
    no waiter left it finishes and is cached, a retry then finds it). One that overruns the
    timeout is left to finish on its thread (its result is dropped and its spec remembered
    as too complex, so a retry is refused at once) and a new thread takes its place, at most
    `threads` such at once: overruns cost at most that many more cores, never the pool.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        limits: CompileLimits,
    ) -> None:
        import xgrammar

        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.vocab_size = vocab_size
        self.limits = limits
        self._compiler = xgrammar.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[str, CompileJob] = OrderedDict()
        self._cache_bytes = 0
        self._queue: deque[CompileJob] = deque()
        self._running: set[CompileJob] = set()
        self._lock = threading.Lock()
        self._closed = False

    # ---------------------------------------------------------------------------- public
    def submit(self, spec: GrammarSpec) -> CompileJob:
        """The job compiling `spec`, joined by one more waiter (who must `release` it when
        its request ends). A spec seen before returns its cached job. Raises
        `GrammarBusyError` when `max_pending` compiles already wait."""
        key = spec.structural_tag
        with self._lock:
            job = self._cache.get(key)
            if job is None:
                if len(self._queue) >= self.limits.max_pending:
                    raise self.busy_error(
                        f"{len(self._queue)} output constraints are waiting to compile "
                        f"(the limit is {self.limits.max_pending})"
                    )
                job = CompileJob(key, self)
                self._queue.append(job)
                self._remember(job)
            else:
                self._cache.move_to_end(key)
            job._waiters += 1
            self._dispatch()
        return job

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache holds now (spec texts + compiled grammars)."""
        return self._cache_bytes

    @property
    def num_pending(self) -> int:
        return len(self._queue)

    def timeout_error(self) -> GrammarTimeoutError:
        return GrammarTimeoutError(
            "the output constraint is too complex: it did not compile within "
            f"{self.limits.timeout_s:g} s"
        )

    def busy_error(self, message: str) -> GrammarBusyError:
        retry = max(1, math.ceil(self.limits.timeout_s))
        return GrammarBusyError(f"{message}; retry in {retry} s", retry_after_s=retry)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            while self._queue:
                self._queue.popleft().future.cancel()

    # -------------------------------------------------------------------------- internal
    def _remember(self, job: CompileJob) -> None:
        """Put `job` in the cache and evict least recently used finished jobs past the
        byte budget (jobs still compiling are never evicted: their waiters hold them)."""
        previous = self._cache.get(job.key)
        if previous is not None:
            self._forget(previous)
        self._cache[job.key] = job
        self._cache_bytes += job.nbytes
        budget = self.limits.cache_bytes
        if self._cache_bytes <= budget:
            return
        for old in list(self._cache.values()):  # oldest first
            if old.future.done() and old is not job:
                self._forget(old)
                if self._cache_bytes <= budget:
                    return
        if job.future.done():
            self._forget(job)  # larger than the whole budget: served, never kept

    def _forget(self, job: CompileJob) -> None:
        if self._cache.get(job.key) is job:
            del self._cache[job.key]
            self._cache_bytes -= job.nbytes

    def _release(self, job: CompileJob) -> None:
        with self._lock:
            job._waiters -= 1
            if job._waiters > 0 or job.started_at is not None or job.future.done():
                return
            # Nobody waits and it has not started: drop it before it costs anything.
            self._queue.remove(job)
            job.future.cancel()
            self._forget(job)

    def poll(self) -> None:
        """Notice compiles that ran past the timeout and start queued ones in their place
        (the engine calls this each step while requests wait for grammars)."""
        with self._lock:
            self._dispatch()

    def _ran_past_timeout(self, job: CompileJob) -> bool:
        started = job.started_at
        return started is not None and time.monotonic() - started > self.limits.timeout_s

    def _dispatch(self) -> None:
        """Start queued jobs while fewer than `threads` run within their time (under the
        lock). Overrunning jobs do not count, up to `threads` of them."""
        for job in self._running:
            if not job.overran and self._ran_past_timeout(job):
                job.overran = True
                logger.warning(
                    "a grammar compile ran past %.1f s: its requests are refused, another "
                    "thread takes its place",
                    self.limits.timeout_s,
                )
        overrunning = sum(1 for job in self._running if job.overran)
        live = len(self._running) - overrunning
        room = self.limits.threads - live - max(0, overrunning - self.limits.threads)
        while room > 0 and self._queue and not self._closed:
            job = self._queue.popleft()
            job.started_at = time.monotonic()
            job.future.set_running_or_notify_cancel()
            self._running.add(job)
            # NOTE: not a daemon: interpreter exit waits for a running compile (a daemon
            # thread inside xgrammar's C++ at exit aborts the process).
            threading.Thread(target=self._run, args=(job,), name="grammar-compile").start()
            room -= 1

    def _compile(self, structural_tag: str) -> xgrammar.CompiledGrammar:
        start = time.perf_counter()
        tag = with_json_whitespace(structural_tag, self.limits.json_any_whitespace)
        compiled = self._compiler.compile_structural_tag(tag)
        logger.debug("compiled a grammar in %.1f ms", (time.perf_counter() - start) * 1e3)
        return compiled

    def _run(self, job: CompileJob) -> None:
        try:
            compiled = self._compile(job.key)
        except Exception as exc:  # a bad constraint: every waiter gets the error
            with self._lock:
                self._running.discard(job)
                job.future.set_exception(
                    GrammarCompileError(f"the output constraint failed to compile: {exc}")
                )
                self._dispatch()
            return
        with self._lock:
            self._running.discard(job)
            if job.overran or self._ran_past_timeout(job):
                # Its waiters were told it is too complex: remember that, not the grammar.
                job.future.set_exception(self.timeout_error())
            else:
                self._forget(job)
                job.nbytes += compiled.memory_size_bytes
                job.future.set_result(compiled)
                if not self._closed:
                    self._remember(job)
            self._dispatch()
