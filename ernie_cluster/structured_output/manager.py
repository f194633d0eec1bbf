"""Driver-side grammar state: one matcher per constrained sequence, advanced with every token
it accepts, and the step's token bitmask for the constrained rows that sample.

Lives with the scheduler, so preemption, recompute, prefix-cache hits and n > 1 need nothing
special: a matcher follows a sequence's output tokens, which none of those change. Only rank 0
(the sampler) ever sees the bitmask.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import xgrammar

from ernie_cluster.step_io import GrammarBitmask
from ernie_cluster.structured_output.compiler import GrammarCompiler
from ernie_cluster.structured_output.params import GrammarSpec
from ernie_cluster.structured_output.utf8_guard import Utf8Guard
from ernie_cluster.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class GrammarState:
    """One sequence's constraint."""

    spec: GrammarSpec
    future: Future
    stop_token_ids: list[int]
    matcher: xgrammar.GrammarMatcher | None = field(default=None, repr=False)
    active: bool = False
    """The constraint applies (its start token was generated, or it has none)."""
    error: str | None = None
    last_token: int | None = None

    def __post_init__(self) -> None:
        self.active = self.spec.start_token_id is None

    @property
    def is_ready(self) -> bool:
        """Compiled (or failed): the sequence may be scheduled."""
        return self.future.done()

    def _matcher(self) -> xgrammar.GrammarMatcher | None:
        if self.matcher is None and self.error is None:
            try:
                compiled = self.future.result()
            except Exception as exc:
                self.error = f"the output constraint failed to compile: {exc}"
                return None
            self.matcher = xgrammar.GrammarMatcher(
                compiled, override_stop_tokens=self.stop_token_ids or None
            )
        return self.matcher

    @property
    def constrains_next_token(self) -> bool:
        return self.active and self._matcher() is not None and not self.matcher.is_terminated()

    def accept(self, token: int) -> bool:
        """Advance by one generated token; True when the constraint is complete (the sequence
        must end). A token the grammar refuses ends the sequence with an error."""
        self.last_token = token
        if not self.active:
            self.active = token == self.spec.start_token_id
            return False
        matcher = self._matcher()
        if matcher is None:
            return True
        if not matcher.accept_token(token):
            self.error = f"token {token} broke the output constraint"
            logger.error("%s (grammar %s)", self.error, self.spec.structural_tag[:200])
            return True
        return matcher.is_terminated()


class StructuredOutputManager:
    """Compiles the engine's grammars and builds each step's bitmask."""

    def __init__(
        self, tokenizer: Tokenizer | None, vocab_size: int, eos_token_ids: Iterable[int]
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = sorted(set(eos_token_ids))
        self._compiler: GrammarCompiler | None = None
        self._utf8_guard: Utf8Guard | None = None

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:  # built on first use: serving without grammars costs nothing
            if self._tokenizer is None:
                raise ValueError("structured outputs need a checkpoint with a tokenizer")
            self._compiler = GrammarCompiler(self._tokenizer, self._vocab_size, self._eos_token_ids)
            self._utf8_guard = Utf8Guard(self._tokenizer)
        return self._compiler

    def new_state(self, spec: GrammarSpec, stop_token_ids: Iterable[int]) -> GrammarState:
        """Start compiling `spec` (or reuse its cached compilation) for one sequence."""
        stops = sorted(set(stop_token_ids)) or self._eos_token_ids
        return GrammarState(spec, self.compiler.submit(spec), stops)

    @staticmethod
    def wait_for_any(states: Iterable[GrammarState], timeout_s: float) -> None:
        """Block until one pending compilation finishes (the engine has nothing else to run)."""
        pending = {s.future for s in states if not s.future.done()}
        if pending:
            wait(pending, timeout=timeout_s, return_when=FIRST_COMPLETED)

    def bitmask(self, sampling: list[tuple[str, GrammarState]]) -> GrammarBitmask | None:
        """[G, ceil(V/32)] allowed-token bits of the constrained rows sampling this step."""
        rows = [(req_id, s) for req_id, s in sampling if s.constrains_next_token]
        if not rows:
            return None
        bits = xgrammar.allocate_token_bitmask(len(rows), self._vocab_size)  # [G, W] int32
        guard = self._utf8_guard
        for i, (_, state) in enumerate(rows):
            state.matcher.fill_next_token_bitmask(bits, i)
            banned = guard.banned_after(state.last_token) if guard is not None else []
            if banned:
                guard.clear(bits, i, banned)
        return GrammarBitmask([req_id for req_id, _ in rows], bits)

    def shutdown(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown()
