"""Driver-side grammar state: one matcher per constrained sequence, advanced with every token
it accepts, and the step's token bitmask for the constrained rows that sample.

Lives with the scheduler, so preemption, recompute, prefix-cache hits and n > 1 need nothing
special: a matcher follows a sequence's output tokens, which none of those change. Only rank 0
(the sampler) ever sees the bitmask. A sequence runs only once its grammar compiled; one whose
compile failed, overran or could not start in time is reported by `failures` (the engine ends
its request with that worded error) and never runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ernie_cluster.step_io import GrammarBitmask
from ernie_cluster.structured_output.compiler import (
    CompileJob,
    CompileLimits,
    GrammarCompiler,
    GrammarError,
)
from ernie_cluster.structured_output.params import GrammarSpec
from ernie_cluster.structured_output.utf8_guard import Utf8Guard

if TYPE_CHECKING:
    import torch
    import xgrammar
from ernie_cluster.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class GrammarState:
    """One sequence's constraint."""

    spec: GrammarSpec
    job: CompileJob
    stop_token_ids: list[int]
    matcher: xgrammar.GrammarMatcher | None = field(default=None, repr=False)
    active: bool = False
    """The constraint applies (its start token was generated, or it has none)."""
    error: str | None = None
    last_token: int | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    released: bool = False
    _ready: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.active = self.spec.start_token_id is None

    @property
    def future(self) -> Future:
        return self.job.future

    @property
    def is_ready(self) -> bool:
        """Compiled: the sequence may be scheduled. (One whose compile failed never is: the
        engine ends its request with `failure`.)"""
        if not self._ready:
            future = self.job.future
            self._ready = future.done() and not future.cancelled() and future.exception() is None
        return self._ready

    @property
    def failure(self) -> GrammarError | None:
        """Why this sequence's grammar will never come (compile error, timeout, busy pool)."""
        if self.is_ready:
            return None
        return self.job.failure(time.monotonic() - self.submitted_at)

    def release(self) -> None:
        """The sequence ended: stop waiting for the compile (the last waiter cancels it)."""
        if not self.released:
            self.released = True
            self.job.release()

    def _matcher(self) -> xgrammar.GrammarMatcher:
        if self.matcher is None:  # only once ready: a failed compile never runs a step
            import xgrammar  # NOTE: here, where grammars run: it pulls in torch

            self.matcher = xgrammar.GrammarMatcher(
                self.job.future.result(), override_stop_tokens=self.stop_token_ids or None
            )
        return self.matcher

    @property
    def constrains_next_token(self) -> bool:
        return self.active and not self._matcher().is_terminated()

    def accept(self, token: int) -> bool:
        """Advance by one generated token; True when the constraint is complete (the sequence
        must end). A token the grammar refuses ends the sequence with an error."""
        self.last_token = token
        if not self.active:
            self.active = token == self.spec.start_token_id
            return False
        matcher = self._matcher()
        if not matcher.accept_token(token):
            self.error = f"token {token} broke the output constraint"
            logger.error("%s (grammar %s)", self.error, self.spec.structural_tag[:200])
            return True
        return matcher.is_terminated()

    def allowed_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens` (speculative proposals) the constraint accepts in a row from
        its current state, which is left as it was."""
        return self._walk(tokens)

    def fill_bitmask_rows(
        self, drafts: list[int], bits: torch.Tensor, first_row: int, guard: Utf8Guard | None
    ) -> list[int]:
        """Fill row first_row + i of `bits` [*, W] with the allowed tokens after the first i
        proposals, for each position i the constraint restricts; returns those positions."""
        used: list[int] = []

        def visit(i: int, constrains: bool, last: int | None) -> None:
            if not constrains:
                return
            self.matcher.fill_next_token_bitmask(bits, first_row + i)
            banned = guard.banned_after(last) if guard is not None else []
            if banned:
                guard.clear(bits, first_row + i, banned)
            used.append(i)

        self._walk(drafts, visit)
        return used

    def _walk(
        self, tokens: list[int], visit: Callable[[int, bool, int | None], None] | None = None
    ) -> int:
        """Advance a trial copy of the state through `tokens`, calling `visit(i, constrains,
        previous token)` at each position 0..len(tokens) reached; stops at the first token the
        constraint refuses (or once it is complete) and returns how many were taken. The
        matcher is rolled back afterwards."""
        matcher = self._matcher()
        active, last, steps = self.active, self.last_token, 0
        try:
            for i in range(len(tokens) + 1):
                if visit is not None:
                    visit(i, active and not matcher.is_terminated(), last)
                if i == len(tokens):
                    return i
                token = tokens[i]
                if not active:
                    active = token == self.spec.start_token_id
                elif matcher.is_terminated() or not matcher.accept_token(token):
                    return i
                else:
                    steps += 1
                last = token
            return len(tokens)
        finally:
            if steps:
                matcher.rollback(steps)


class StructuredOutputManager:
    """Compiles the engine's grammars and builds each step's bitmask."""

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        limits: CompileLimits,
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = sorted(set(eos_token_ids))
        self._limits = limits
        self._compiler: GrammarCompiler | None = None
        self._utf8_guard: Utf8Guard | None = None

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:  # built on first use: serving without grammars costs nothing
            if self._tokenizer is None:
                raise ValueError("structured outputs need a checkpoint with a tokenizer")
            self._compiler = GrammarCompiler(
                self._tokenizer, self._vocab_size, self._eos_token_ids, self._limits
            )
            self._utf8_guard = Utf8Guard(self._tokenizer)
        return self._compiler

    def new_state(self, spec: GrammarSpec, stop_token_ids: Iterable[int]) -> GrammarState:
        """Start compiling `spec` (or reuse its cached compilation) for one sequence; raises
        `GrammarBusyError` when too many compiles already wait."""
        stops = sorted(set(stop_token_ids)) or self._eos_token_ids
        return GrammarState(spec, self.compiler.submit(spec), stops)

    def failures(self, requests: Iterable[Any]) -> list[tuple[Any, GrammarError]]:
        """The requests (anything with a `.grammar`) whose grammar will never come, each with
        its worded error; also lets the pool replace compiles that ran past the timeout."""
        if self._compiler is None:
            return []
        self._compiler.poll()
        failed = []
        for request in requests:
            state = request.grammar
            if state is not None and (error := state.failure) is not None:
                failed.append((request, error))
        return failed

    @staticmethod
    def wait_for_any(states: Iterable[GrammarState], timeout_s: float) -> None:
        """Block until one pending compilation finishes (the engine has nothing else to run)."""
        pending = {s.future for s in states if not s.future.done()}
        if pending:
            wait(pending, timeout=timeout_s, return_when=FIRST_COMPLETED)

    def bitmask(self, sampling: list[tuple[str, GrammarState, list[int]]]) -> GrammarBitmask | None:
        """[G, ceil(V/32)] allowed-token bits of the constrained rows sampling this step. A
        sequence verifying proposals (the list; empty: none) samples 1 + k positions: its row
        for position i is the constraint's state after the first i proposals."""
        import xgrammar

        sampling = [(r, s, d) for r, s, d in sampling if d or s.constrains_next_token]
        if not sampling:
            return None
        guard = self._utf8_guard
        # [sum of 1 + k, W]: one block of rows per sequence, its position i at first + i
        bits = xgrammar.allocate_token_bitmask(
            sum(1 + len(d) for _, _, d in sampling), self._vocab_size
        )
        request_ids: list[str] = []
        offsets: list[int] = []
        rows: list[int] = []
        first = 0
        for req_id, state, drafts in sampling:
            used = state.fill_bitmask_rows(drafts, bits, first, guard)
            request_ids.extend([req_id] * len(used))
            offsets.extend(used)
            rows.extend(first + i for i in used)
            first += 1 + len(drafts)
        if not rows:
            return None
        if len(rows) < first:
            bits = bits[rows]  # [G, W] only the restricted positions
        return GrammarBitmask(request_ids, bits, offsets if any(offsets) else None)

    def shutdown(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown()
