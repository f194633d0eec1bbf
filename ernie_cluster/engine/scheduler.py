"""The scheduler: which requests advance by how many tokens this step.

One rule covers prefill, chunked prefill, decode, prefix-cache hits and recompute: each
request's `num_computed_tokens` catches up with its `num_tokens` under a per-step token budget.
Running requests go first (so decodes step every step while a long prompt advances chunk by
chunk); when KV blocks run out the lowest-priority (newest) running request is preempted and
recomputed later. With a host KV tier, a request whose prefix continues in host memory (an
evicted session, or a preempted request's blocks written down on eviction: swap instead of
recompute) waits one step in LOADING while its blocks are copied back, then runs from there.
The scheduler owns block allocation through the KV cache manager; it never touches tensors
and never decides what a worker computes beyond the token counts and the copies.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ernie_cluster.engine.kv_cache import KVCacheManager
from ernie_cluster.engine.request import Request, RequestStatus
from ernie_cluster.engine.speculative.stats import SpecDecodeStats
from ernie_cluster.engine.speculative.step_slots import add_proposals, reserve_lookahead
from ernie_cluster.step_io import (
    CachedRequestData,
    NewRequestData,
    SchedulerOutput,
)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    num_lookahead_tokens: int = 0
    """draft_model: slots reserved past a sampling request's tokens for the draft's
    proposals, unless the request says otherwise (vLLM's num_lookahead_tokens; 0: none)."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    num_preemptions: int = 0
    num_scheduled_tokens: int = 0
    """All tokens computed so far (prefill chunks, recomputes and decodes)."""
    num_prompt_tokens_computed: int = 0
    """Prompt tokens actually run through the model (prefix-cache hits excluded)."""
    spec: SpecDecodeStats = field(default_factory=SpecDecodeStats)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: list[Request] = []  # sorted by Request.sort_key
        self.running: list[Request] = []  # sorted by Request.sort_key
        self.loading: list[Request] = []  # host blocks being copied back; they run next step
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        # Blocks each request's workers already know about, to send only the new ones.
        self._num_sent_blocks: dict[str, int] = {}
        self._resumed: set[str] = set()
        self._finished_since_last_step: list[str] = []
        # Requests whose table was trimmed after a speculative step: blocks the workers keep.
        self._num_kept_blocks: dict[str, int] = {}

    # ---------------------------------------------------------------- requests in and out
    def add_request(self, request: Request) -> None:
        needed = request.num_prompt_tokens + request.max_tokens
        if not self.kv_cache.can_ever_fit(needed):
            raise ValueError(
                f"request needs {self.kv_cache.num_blocks_needed(needed)} KV blocks for "
                f"{needed} tokens (prompt {request.num_prompt_tokens} + max_tokens "
                f"{request.max_tokens}) but the cache holds only {self.kv_cache.num_blocks}"
            )
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests (abort, stop, error) and free their blocks at once."""
        ended = []
        for req_id in request_ids:
            request = self.requests.pop(req_id, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request.status == RequestStatus.LOADING:
                self.loading.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            request.status = status
            self._free(request)
            ended.append(request)
        return ended

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting or self.loading)

    @property
    def num_active(self) -> int:
        """Requests holding blocks: running, or loading them back from the host."""
        return len(self.running) + len(self.loading)

    # ---------------------------------------------------------------------------- a step
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput(finished_req_ids=self._finished_since_last_step)
        self._finished_since_last_step = []
        preempted = False
        self._finish_loading()

        waiting_reserve = self._waiting_reserve()
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new > 1:
                # A prefill chunk leaves one token for every running request behind it (so
                # decodes step every step) and a share for a waiting request (so a short
                # request is not stuck behind a 128K prompt).
                others = len(self.running) - index - 1 + waiting_reserve
                num_new = max(min(num_new, budget - others), min(num_new, budget, 16))
            table = self.kv_cache.allocate_slots(
                request.request_id, request.num_computed_tokens + num_new
            )
            while table is None:
                victim = self.running.pop()  # highest sort key: lowest priority, newest
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
                table = self.kv_cache.allocate_slots(
                    request.request_id, request.num_computed_tokens + num_new
                )
            if table is None:
                break
            self._add_to_output(out, request, table, num_new)
            budget -= num_new
            index += 1

        # NOTE: no new admissions in a step that had to preempt: memory is short.
        if not preempted:
            budget = self._admit_waiting(out, budget)
            add_proposals(self, out, budget)
            reserve_lookahead(self, out)

        out.kv_saves, out.kv_loads = self.kv_cache.take_copy_ops()
        self.stats.num_running = len(self.running)
        self.stats.num_waiting = len(self.waiting)
        self.stats.num_scheduled_tokens += out.total_num_scheduled_tokens
        return out

    def extend_table(self, out: SchedulerOutput, request: Request, num_tokens: int) -> bool:
        """Grow the table of a request scheduled in `out` to hold `num_tokens` from the free
        blocks, its new blocks sent with its entry; False (nothing taken) when short."""
        req_id = request.request_id
        table = self.kv_cache.allocate_slots(req_id, num_tokens)
        if table is None:
            return False
        sent = self._num_sent_blocks[req_id]
        if len(table) > sent:
            entry = next((c for c in out.cached_requests if c.req_id == req_id), None)
            if entry is not None:
                entry.new_block_ids.extend(table[sent:])
            else:  # new to the workers this step: its entry carries the whole table
                new = next(n for n in out.new_requests if n.req_id == req_id)
                new.block_ids.extend(table[sent:])
            self._num_sent_blocks[req_id] = len(table)
        return True

    def _finish_loading(self) -> None:
        """Last step's copies are in the workers' queues ahead of this step: run those
        requests (the workers order their forward after the copies)."""
        if not self.loading:
            return
        now = time.monotonic()
        host_stats = self.kv_cache.host.stats
        for request in self.loading:
            host_stats.load_wait_s += now - request.loading_since
            request.loading_since = None
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: r.sort_key)
        self.loading = []

    def _waiting_reserve(self) -> int:
        """Tokens kept back from running prefills for the first admissible waiting request."""
        if self.num_active >= self.config.max_num_seqs:
            return 0
        for request in self.waiting:
            if request.is_ready():
                wanted = request.num_tokens - request.num_computed_tokens
                return min(wanted, self.config.max_num_batched_tokens // 4)
        return 0

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        position = 0
        while (
            position < len(self.waiting)
            and budget > 0
            and self.num_active < self.config.max_num_seqs
        ):
            request = self.waiting[position]
            if not request.is_ready():
                position += 1
                continue
            computed_blocks, num_computed, host_hashes = self._cache_hits(request)
            if host_hashes:
                if not self._start_loading(request, computed_blocks, num_computed, host_hashes):
                    break
                del self.waiting[position]
                continue
            num_new = min(request.num_tokens - num_computed, budget)
            table = self.kv_cache.allocate_slots(
                request.request_id, num_computed + num_new, computed_blocks
            )
            if table is None:
                break
            del self.waiting[position]
            if request.status == RequestStatus.PREEMPTED:
                self._resumed.add(request.request_id)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_computed
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            request.first_scheduled_time = request.first_scheduled_time or time.monotonic()
            bisect.insort(self.running, request, key=lambda r: r.sort_key)
            self._add_to_output(out, request, table, num_new)
            budget -= num_new
        return budget

    def _cache_hits(self, request: Request) -> tuple[list[int], int, list[int]]:
        """(device blocks, computed tokens, host hashes) the request may reuse; none for one
        whose prompt logprobs need every prompt position computed."""
        if request.needs_prompt_logprobs:
            return [], 0, []
        computed_blocks, num_computed = self.kv_cache.get_computed_blocks(
            request.request_id, request.all_token_ids
        )
        host_hashes = self.kv_cache.match_host_blocks(
            request.request_id, request.all_token_ids, len(computed_blocks)
        )
        return computed_blocks, num_computed, host_hashes

    def _start_loading(
        self,
        request: Request,
        computed_blocks: list[int],
        num_computed: int,
        host_hashes: list[int],
    ) -> bool:
        """Give the request blocks for its device and host hits and plan the host copies; it
        computes nothing this step (no token budget). False when the device pool is short."""
        num_loaded = len(host_hashes) * self.kv_cache.block_size
        table = self.kv_cache.allocate_slots(
            request.request_id, num_computed + num_loaded, computed_blocks
        )
        if table is None:
            return False
        self.kv_cache.load_host_blocks(request.request_id, host_hashes, len(computed_blocks))
        if request.status == RequestStatus.PREEMPTED:
            self._resumed.add(request.request_id)
            self.kv_cache.host.stats.swapped_in_tokens += num_loaded
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_computed + num_loaded
        request.num_computed_tokens = num_computed + num_loaded
        request.status = RequestStatus.LOADING
        request.loading_since = time.monotonic()
        request.first_scheduled_time = request.first_scheduled_time or request.loading_since
        self.loading.append(request)
        return True

    def _add_to_output(
        self, out: SchedulerOutput, request: Request, table: list[int], num_new: int
    ) -> None:
        req_id = request.request_id
        sent = self._num_sent_blocks.get(req_id)
        if sent is None:
            self._resumed.discard(req_id)  # preempted before it ever ran: new to the workers
            out.new_requests.append(
                NewRequestData(
                    req_id=req_id,
                    prompt_token_ids=request.prompt_token_ids,
                    params=request.params,
                    stop_token_ids=sorted(request.stop_token_ids),
                    sample_index=request.sample_index,
                    block_ids=list(table),
                    num_computed_tokens=request.num_computed_tokens,
                )
            )
        else:
            resumed = req_id in self._resumed
            self._resumed.discard(req_id)
            out.cached_requests.append(
                CachedRequestData(
                    req_id=req_id,
                    new_block_ids=list(table) if resumed else table[sent:],
                    num_computed_tokens=request.num_computed_tokens,
                    resumed=resumed,
                    num_kept_blocks=self._num_kept_blocks.pop(req_id, None),
                )
            )
        self._num_sent_blocks[req_id] = len(table)
        out.num_scheduled_tokens[req_id] = num_new
        prompt_left = request.num_prompt_tokens - request.num_computed_tokens
        self.stats.num_prompt_tokens_computed += max(0, min(num_new, prompt_left))
        request.num_computed_tokens += num_new

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request.request_id)
        self._num_kept_blocks.pop(request.request_id, None)
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def _free(self, request: Request) -> None:
        self.kv_cache.free(request.request_id)
        self._num_kept_blocks.pop(request.request_id, None)
        self._resumed.discard(request.request_id)
        if self._num_sent_blocks.pop(request.request_id, None) is not None:
            self._finished_since_last_step.append(request.request_id)

    # ------------------------------------------------------------------ after the step
    def update_from_output(
        self, out: SchedulerOutput, sampled: dict[str, list[int]]
    ) -> list[tuple[Request, list[int] | None]]:
        """Take back the slots of rejected proposals, append the new tokens, publish newly
        written KV blocks and end the sequences those tokens stop (`check_stop`: stop tokens,
        max_tokens, max_model_len; tokens after a stopping one are dropped).

        Returns (request, tokens appended) for each request that sampled, the ones ended here
        included (their status says why), and (request, None) for each max_tokens = 0
        request whose prompt is now computed: it ends ("length") without a token. Stop
        strings need the detokenized text: the output processor matches them and the engine
        ends those sequences through `finish_requests`.
        """
        appended = []
        stopped: dict[RequestStatus, list[str]] = {}
        for req_id in out.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            tokens = sampled.get(req_id)
            drafts = out.spec_token_ids.get(req_id)
            if drafts and tokens:
                # Positions past the last accepted proposal hold rejected KV: recompute them.
                request.num_computed_tokens -= len(drafts) + 1 - len(tokens)
                self.stats.spec.record(len(drafts), len(tokens) - 1)
                request.last_verified = (len(drafts), len(tokens) - 1)
            if request.max_tokens == 0:
                self._cache(request)
                if request.num_computed_tokens >= request.num_prompt_tokens:
                    appended.append((request, None))
                    stopped.setdefault(RequestStatus.FINISHED_LENGTH, []).append(req_id)
                continue
            kept: list[int] = []
            for token in tokens or ():
                request.output_token_ids.append(token)
                kept.append(token)
                status = check_stop(request, token, self.config.max_model_len)
                if status is not None:
                    stopped.setdefault(status, []).append(req_id)
                    break
            self._cache(request)
            lookahead = req_id in out.num_lookahead_tokens
            if (drafts or lookahead) and tokens and request.status == RequestStatus.RUNNING:
                self._trim(request)
            if kept:
                appended.append((request, kept))
        for status, req_ids in stopped.items():
            self.finish_requests(req_ids, status)
        return appended

    def _cache(self, request: Request) -> None:
        """Publish the request's blocks its computed tokens filled."""
        # NOTE: a stop token among accepted proposals leaves computed KV past the tokens kept.
        num_computed = min(request.num_computed_tokens, request.num_tokens)
        if self.kv_cache.needs_caching(request.request_id, num_computed):
            self.kv_cache.cache_blocks(request.request_id, request.all_token_ids, num_computed)

    def _trim(self, request: Request) -> None:
        """Give back the blocks only rejected proposals or the draft's lookahead used; the
        workers cut their tables to match on the request's next step."""
        kept = self.kv_cache.trim(request.request_id, request.num_tokens)
        if kept is not None:
            self._num_sent_blocks[request.request_id] = kept
            self._num_kept_blocks[request.request_id] = kept


def check_stop(request: Request, token: int, max_model_len: int) -> RequestStatus | None:
    """The status `token` (just appended) ends the sequence with, None when it goes on.

    A stop token (eos unless ignore_eos, and params.stop_token_ids) ends it once min_tokens
    are out, and wins over a length limit reached by the same token; then max_tokens and
    max_model_len. Stop strings are the output processor's: they need the text.
    """
    if request.num_output_tokens >= request.params.min_tokens and token in request.stop_token_ids:
        request.stop_reason = token
        return RequestStatus.FINISHED_STOPPED
    if request.num_output_tokens >= request.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None
