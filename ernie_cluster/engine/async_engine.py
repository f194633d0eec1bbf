"""AsyncLLMEngine: the step loop as an asyncio service with streaming per-request outputs.

`async for out in engine.generate(prompt, params, request_id)` yields deltas (new tokens and
text only). Steps run in a worker thread so the event loop stays responsive; requests are
added and aborted between steps under one lock. A consumer that stops iterating (client
disconnect, cancellation) aborts its request and frees its KV blocks at once. If a step fails
the engine is marked dead: every in-flight request gets the error and health checks fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.engine.llm_engine import BatchFailedError, EngineStats, LLMEngine, Prompt
from ernie_cluster.inputs.engine_request import EngineRequest
from ernie_cluster.outputs import RequestOutput, accumulate
from ernie_cluster.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def merge_deltas(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """One delta output equal to `first` followed by `second` (same request)."""
    by_index = {sample.index: sample for sample in first.outputs}
    accumulate(by_index, second)
    second.outputs = [by_index[i] for i in sorted(by_index)]
    if second.prompt_logprobs is None:
        second.prompt_logprobs = first.prompt_logprobs
    return second


class EngineDeadError(RuntimeError):
    """The engine stopped stepping (a worker died or a step failed); rebuild it."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    finished: bool = False


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, _Stream] = {}
        self._lock: asyncio.Lock | None = None
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._dead: BaseException | None = None
        self._closed = False
        self._pending_aborts: set[str] = set()
        self._num_adding = 0

    @classmethod
    def from_config(cls, config: EngineConfig, **kwargs) -> AsyncLLMEngine:
        return cls(LLMEngine(config, **kwargs))

    # ------------------------------------------------------------------------- public
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and not self._closed

    def check_alive(self) -> None:
        """Raises EngineDeadError once a step has failed or the engine is shut down: a flag
        read, cheap enough for every request."""
        if self._dead is not None:
            raise EngineDeadError(f"engine is dead: {self._dead}") from self._dead
        if self._closed:
            raise EngineDeadError("engine is shut down")

    def check_health(self) -> None:
        """`check_alive`, then the executor's own probe (pings shard workers: blocking, up to
        its timeout, so callers on an event loop run it in a thread)."""
        self.check_alive()
        try:
            self.engine.executor.check_health()
        except Exception as exc:  # a dead or hung shard worker: the engine cannot step
            raise EngineDeadError(f"engine unhealthy: {exc}") from exc

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs as deltas; the last one has `finished=True`."""
        request = self.engine.processor.process(request_id, prompt, params, priority=priority)
        async for output in self.generate_request(request):
            yield output

    async def generate_request(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """`generate` for a request the input processor already built."""
        async for _, output in self.generate_requests([request]):
            yield output

    async def generate_requests(
        self, requests: list[EngineRequest]
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Several requests added together (one lock, one step boundary), their deltas merged
        as (index in `requests`, delta). The first error ends them all; closing the stream
        aborts every unfinished one.

        NOTE: from the first `__anext__` to the lock, nothing awaits, so a caller's admission
        check just before sees these sequences in `num_waiting` at once.
        """
        self._ensure_loop()
        self.check_alive()
        request_ids = [request.request_id for request in requests]
        taken = [i for i in request_ids if i in self._streams]
        if taken or len(set(request_ids)) != len(request_ids):
            raise ValueError(f"request id {(taken or request_ids)[0]!r} is already in use")
        index_of = {request_id: i for i, request_id in enumerate(request_ids)}
        queue: asyncio.Queue = asyncio.Queue()
        streams: dict[str, _Stream] = {}
        num_sequences = sum(request.params.n for request in requests)
        self._num_adding += num_sequences
        try:
            try:
                async with self._lock:  # type: ignore[union-attr]
                    for request in requests:
                        self.engine.add_engine_request(request)
                        streams[request.request_id] = self._streams[request.request_id] = _Stream(
                            queue
                        )
            finally:
                self._num_adding -= num_sequences
            self._wakeup.set()  # type: ignore[union-attr]
            unfinished = len(streams)
            while unfinished:
                # NOTE: a consumer that fell behind gets every pending delta of a request as
                # one item: under load each hop downstream (Serve streaming, SSE) then costs
                # once per pull, not once per token.
                pending = [await queue.get()]
                while not queue.empty():
                    pending.append(queue.get_nowait())
                merged: dict[str, RequestOutput] = {}
                for item in pending:
                    if isinstance(item, BaseException):
                        raise item
                    earlier = merged.get(item.request_id)
                    merged[item.request_id] = (
                        item if earlier is None else merge_deltas(earlier, item)
                    )
                for request_id, output in merged.items():
                    if output.finished:
                        streams[request_id].finished = True
                        unfinished -= 1
                    yield index_of[request_id], output
        finally:
            for request_id, stream in streams.items():
                self._streams.pop(request_id, None)
                if not stream.finished:
                    self.request_abort(request_id)

    @property
    def num_waiting(self) -> int:
        """Sequences not yet scheduled, including those waiting to be added."""
        return len(self.engine.scheduler.waiting) + self._num_adding

    def num_queued_after(self, num_new_sequences: int) -> int:
        """Waiting requests beyond the free batch slots once `num_new_sequences` more are
        added: those the next step cannot take even with the token budget and KV blocks to
        spare (what admission limits)."""
        scheduler = self.engine.scheduler
        free_slots = max(0, scheduler.config.max_num_seqs - len(scheduler.running))
        return max(0, self.num_waiting + num_new_sequences - free_slots)

    def request_abort(self, request_id: str) -> None:
        """Abort at the next step boundary (at once when idle); never waits.

        NOTE: a cancelled consumer cannot wait for the engine lock (held for a whole step,
        and its cancellation would be re-delivered), so aborts are queued for the loop.
        """
        self._streams.pop(request_id, None)
        self._pending_aborts.add(request_id)
        if self._lock is not None and not self._lock.locked():
            self._apply_aborts()
        elif self._wakeup is not None:
            self._wakeup.set()

    def _apply_aborts(self) -> None:
        if self._pending_aborts:
            pending, self._pending_aborts = self._pending_aborts, set()
            self.engine.abort_request(list(pending))

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    async def shutdown(self) -> None:
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        self._fail_all(EngineDeadError("engine is shut down"))
        self.engine.shutdown()

    # ------------------------------------------------------------------------ the loop
    def _ensure_loop(self) -> None:
        if self._dead is not None or self._closed:
            return
        loop = asyncio.get_running_loop()
        task = self._loop_task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        # NOTE: a new event loop (asyncio.run called again) needs its own lock and event.
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._loop_task = loop.create_task(self._run_loop())

    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                if not self.engine.has_unfinished_requests():
                    self._wakeup.clear()  # type: ignore[union-attr]
                    await self._wakeup.wait()  # type: ignore[union-attr]
                    continue
                async with self._lock:  # type: ignore[union-attr]
                    self._apply_aborts()
                    try:
                        outputs = await loop.run_in_executor(None, self.engine.step, True)
                    except BatchFailedError as failure:  # those requests end; the engine lives
                        outputs = []
                        for request_id in failure.request_ids:
                            stream = self._streams.pop(request_id, None)
                            if stream is not None:
                                stream.queue.put_nowait(failure.errors.get(request_id, failure))
                    self._apply_aborts()
                for output in outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is not None:
                        stream.queue.put_nowait(output)
                # NOTE: yield to the event loop between steps so consumers and new requests
                # get a turn even when the engine is always busy.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a step failed: nothing can run any more
            logger.exception("engine step failed; the engine is now dead")
            self._dead = exc
            self._fail_all(EngineDeadError(f"engine step failed: {exc}"))

    def _fail_all(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(error)
        self._streams.clear()
