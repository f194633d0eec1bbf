"""LLMEngine: the synchronous step loop (add requests, step, read outputs).

Takes `EngineRequest`s from the input processor (or builds them with it), expands n > 1 into
sibling sequences, runs schedule -> grammar bitmask -> execute -> update each step, and turns
sampled tokens into RequestOutputs. One engine per model instance; the executor hides whether
workers are local or Ray actors.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.engine.kv_cache import KVCacheManager
from ernie_cluster.engine.output_processor import OutputProcessor, RequestGroup
from ernie_cluster.engine.request import Request, RequestStatus
from ernie_cluster.engine.scheduler import Scheduler, SchedulerConfig
from ernie_cluster.engine.speculative import SpecDecodeStats, SpeculativeProposer
from ernie_cluster.executor.base import Executor
from ernie_cluster.inputs.engine_request import EngineRequest
from ernie_cluster.inputs.model_facts import ModelFacts
from ernie_cluster.inputs.processor import InputProcessor, Prompt
from ernie_cluster.loader.checkpoint_files import resolve_model_path
from ernie_cluster.model.sharding import ShardSpec
from ernie_cluster.outputs import RequestOutput
from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.structured_output.compiler import CompileLimits
from ernie_cluster.structured_output.manager import StructuredOutputManager
from ernie_cluster.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["BatchFailedError", "EngineStats", "LLMEngine", "Prompt"]

# NOTE: how long a step with nothing runnable waits for a grammar to finish compiling before
# returning to its caller (which may have new requests or aborts to apply).
_GRAMMAR_WAIT_S = 0.05


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_prompt_tokens: int
    """Prompt tokens of all requests added."""
    num_prompt_tokens_computed: int
    """Prompt tokens run through the model (prefix-cache hits excluded, recomputes included)."""
    num_generated_tokens: int
    num_scheduled_tokens: int
    """Every token run through the model (prefill chunks, recomputes, decodes)."""
    expert_tokens_per_layer: torch.Tensor
    """[moe_layers, experts] (token, expert) assignments routed to each expert so far."""
    host_kv_blocks_used: int = 0
    host_kv_blocks_total: int = 0
    """The host KV tier's blocks (0 when --kv-offload-gb is off)."""
    host_kv_hit_tokens: int = 0
    """Prompt tokens copied back from the host tier instead of recomputed."""
    host_kv_swapped_in_tokens: int = 0
    """Of those, tokens of preempted requests (swap instead of recompute)."""
    host_kv_blocks_saved: int = 0
    host_kv_blocks_loaded: int = 0
    host_kv_blocks_dropped: int = 0
    """Host blocks evicted (LRU) or not written for lack of room."""
    host_kv_bytes_moved: int = 0
    """Bytes copied between device and host, all ranks, both directions."""
    host_kv_load_wait_s: float = 0.0
    """Seconds requests waited in LOADING for their blocks to come back (sum)."""
    weight_bytes_per_rank: int = 0
    """Weight bytes of the fullest rank, quantized weights at their resident size."""
    spec_decode: SpecDecodeStats | None = None
    """Speculative decoding counters (None: --speculative-config is off)."""

    @property
    def expert_load_imbalance(self) -> float:
        """max / mean tokens per expert, worst MoE layer (1.0 = perfectly balanced)."""
        load = self.expert_tokens_per_layer.float()
        if load.numel() == 0 or load.sum() == 0:
            return 1.0
        per_layer = load.max(1).values / load.mean(1).clamp(min=1e-9)
        return float(per_layer.max())


class BatchFailedError(RuntimeError):
    """A step failed inside the model (not a dead worker), or requests' output constraints
    could not be compiled: those requests ended with this error (or their own one in
    `errors`, by request id); the engine itself keeps serving."""

    def __init__(
        self,
        request_ids: list[str],
        cause: BaseException,
        errors: dict[str, BaseException] | None = None,
    ) -> None:
        super().__init__(f"generation failed for this batch: {type(cause).__name__}: {cause}")
        self.request_ids = request_ids
        self.errors = errors or {}


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        executor_factory: Callable[[EngineConfig, str], Executor] | None = None,
    ) -> None:
        self.model_dir = resolve_model_path(config.model, config.revision)
        self.model_config = ErnieMoeConfig.from_pretrained(self.model_dir)
        self.config = config.resolve(self.model_config)
        self.tokenizer: Tokenizer | None = load_tokenizer(self.model_dir)
        self.facts = ModelFacts.load(
            self.model_dir, self.model_config, self.tokenizer, self.config.max_model_len
        )
        self.processor = InputProcessor(self.facts, self.tokenizer)
        self.structured = StructuredOutputManager(
            self.tokenizer,
            self.model_config.vocab_size,
            self.facts.eos_token_ids,
            CompileLimits.from_config(self.config),
        )
        ShardSpec(0, self.config.world_size).check(self.model_config)  # before any worker starts
        if executor_factory is None:
            from ernie_cluster.executor import make_executor

            executor_factory = make_executor
        self.executor: Executor = executor_factory(self.config, str(self.model_dir))
        per_rank = self.executor.collective_rpc("resident_parameter_bytes")
        self._weight_bytes_per_rank = max(sum(sizes.values()) for sizes in per_rank)
        num_host_blocks, self._host_block_bytes = 0, 0
        if self.config.kv_offload_enabled:
            tiers = self.executor.collective_rpc("host_kv_tier")  # [(blocks, bytes)] per rank
            num_host_blocks = min(blocks for blocks, _ in tiers)
            self._host_block_bytes = sum(size for _, size in tiers)
        self.kv_cache = KVCacheManager(
            self.executor.num_kv_blocks,
            self.config.block_size,
            self.config.enable_prefix_caching,
            num_host_blocks=num_host_blocks,
        )
        spec = self.config.speculative_config
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=self.config.max_num_seqs,
                max_num_batched_tokens=self.config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                num_lookahead_tokens=spec.num_lookahead_tokens if spec else 0,
            ),
            self.kv_cache,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.proposer = SpeculativeProposer(spec, self.max_model_len) if spec else None
        self._arrival = itertools.count()
        self._num_prompt_tokens = 0
        self._num_generated_tokens = 0

    @property
    def max_model_len(self) -> int:
        return int(self.config.max_model_len)  # resolved in __init__

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.facts.eos_token_ids

    # ------------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        priority: int = 0,
    ) -> None:
        """Process and add one request (raises ValueError / InputError on bad input)."""
        self.add_engine_request(
            self.processor.process(request_id, prompt, params, priority=priority)
        )

    def add_engine_request(self, request: EngineRequest) -> None:
        """Add a request the input processor built; nothing is checked again."""
        request_id, params = request.request_id, request.params
        if request_id in self.output_processor.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = next(self._arrival)
        sequences: list[Request] = []
        for index in range(params.n):
            sequences.append(
                Request(
                    request_id=request_id if params.n == 1 else f"{request_id}#{index}",
                    prompt_token_ids=request.prompt_token_ids,
                    params=params,
                    stop_token_ids=request.stop_token_ids,
                    max_tokens=request.max_tokens,
                    parent_id=request_id,
                    sample_index=index,
                    priority=request.priority,
                    arrival_seq=arrival,
                    answer_start_token_id=request.answer_start_token_id,
                    prefill_leader=sequences[0]
                    if index and self.config.enable_prefix_caching
                    else None,
                )
            )
        if request.grammar is not None:
            for sequence in sequences:
                sequence.grammar = self.structured.new_state(
                    request.grammar, request.stop_token_ids
                )
        try:
            for sequence in sequences:
                self.scheduler.add_request(sequence)  # raises before anything is half-added
        except Exception:
            for sequence in sequences:
                if sequence.grammar is not None:
                    sequence.grammar.release()
            raise
        group = RequestGroup(request_id, request.prompt_text, request.prompt_token_ids)
        self.output_processor.add_group(group, sequences)
        self._num_prompt_tokens += len(request.prompt_token_ids)

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        for request_id in ids:
            group = self.output_processor.groups.get(request_id)
            if group is None:
                continue
            ended = self.scheduler.finish_requests(
                [seq.request.request_id for seq in group.sequences],
                RequestStatus.FINISHED_ABORTED,
            )
            for request in ended:
                self.output_processor.mark_finished(request)
            self.output_processor.remove_group(group)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---------------------------------------------------------------------------- step
    def step(self, delta: bool = False) -> list[RequestOutput]:
        """Run one step; return outputs of requests that changed (cumulative by default)."""
        self._end_failed_grammars()
        if self.proposer is not None:
            self.proposer.propose(self.scheduler.running, self.scheduler.requests)
        scheduler_output = self.scheduler.schedule()
        if (
            scheduler_output.is_empty
            and not scheduler_output.finished_req_ids
            and not scheduler_output.has_kv_copies
        ):
            # Nothing runnable: the waiting requests' grammars are still compiling.
            self.structured.wait_for_any(
                (r.grammar for r in self.scheduler.waiting if r.grammar is not None),
                _GRAMMAR_WAIT_S,
            )
            return []
        scheduler_output.grammar = self._grammar_bitmask(scheduler_output)
        try:
            runner_output = self.executor.execute_model(scheduler_output)
        except Exception as exc:
            if not self.executor.recovers_from_step_errors:
                raise
            logger.exception("a step failed; ending the requests it carried")
            self._fail_batch(scheduler_output, exc)
        # The scheduler appends the tokens and ends the sequences a stop token or a length
        # limit stops; a stop string or the output constraint may end (or re-word) more here.
        appended = self.scheduler.update_from_output(
            scheduler_output, runner_output.sampled_token_ids
        )
        if self.proposer is not None:
            self.proposer.take_draft_tokens(runner_output.draft_token_ids)
        for req_id, entries in runner_output.prompt_logprobs.items():
            self.output_processor.add_prompt_logprobs(req_id, entries)
        touched: dict[str, RequestGroup] = {}
        to_finish: dict[RequestStatus, list[Request]] = {}
        for request, tokens in appended:
            status = request.status if request.is_finished else None
            if tokens is not None:
                logprobs = runner_output.logprobs.get(request.request_id)
                status = self._take_tokens(request, tokens, logprobs) or status
            if status is not None:
                to_finish.setdefault(status, []).append(request)
            touched[request.parent_id] = self.output_processor.group_of[request.request_id]
        for status, requests in to_finish.items():
            self._finish(requests, status)
        outputs = []
        for group in touched.values():
            outputs.append(self.output_processor.make_output(group, delta=delta))
            if group.finished:
                self.output_processor.remove_group(group)
        return outputs

    def _take_tokens(
        self, request: Request, tokens: list[int], logprobs: list[dict[int, float]] | None
    ) -> RequestStatus | None:
        """Detokenize a sequence's new tokens one by one (several after accepted proposals);
        a stop string or a complete constraint ends it at that token, dropping the rest.
        Returns the status that ends it here (None: it goes on or the scheduler ended it)."""
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            self._num_generated_tokens += 1
            status = None
            entry = logprobs[i] if logprobs is not None else None
            if self.output_processor.process_token(request, token, entry, last):
                status = RequestStatus.FINISHED_STOPPED  # a stop string (wins over length)
            if request.grammar is not None and request.grammar.accept(token):
                # The constraint is complete (or broken): the sequence ends here.
                status = status or RequestStatus.FINISHED_STOPPED
                if request.grammar.error is not None:
                    status = RequestStatus.FINISHED_ERROR
            if status is not None:
                if not last:
                    del request.output_token_ids[i + 1 - len(tokens) :]
                return status
        return None

    def _finish(self, requests: list[Request], status: RequestStatus) -> None:
        """End `requests` with `status`: the live ones through the scheduler; the ones it
        already ended this step (stop token, length) keep their freed blocks and take
        `status` as their reason (a stop string or a broken constraint overrides)."""
        self.scheduler.finish_requests(
            [request.request_id for request in requests if not request.is_finished], status
        )
        for request in requests:
            request.status = status
            self.output_processor.mark_finished(request)

    def _end_failed_grammars(self) -> None:
        """Waiting requests whose grammar will never come (compile error, timeout, busy pool)
        end before they run: raises BatchFailedError with each request's worded error."""
        failed = self.structured.failures(self.scheduler.waiting)
        if failed:
            errors = {request.parent_id: error for request, error in failed}
            self.abort_request(list(errors))
            raise BatchFailedError(list(errors), next(iter(errors.values())), errors)

    def _grammar_bitmask(self, scheduler_output):
        """The bitmask of constrained sequences that sample this step (None: none do)."""
        requests = self.scheduler.requests
        sampling = []
        for req_id in scheduler_output.num_scheduled_tokens:
            request = requests[req_id]
            drafts = scheduler_output.spec_token_ids.get(req_id, [])
            # NOTE: computed counts were advanced when scheduled: a request samples this step
            # when its scheduled tokens (and proposals) reach the end of its sequence
            # (max_tokens = 0: never).
            if (
                request.grammar is not None
                and request.max_tokens > 0
                and request.num_computed_tokens == request.num_tokens + len(drafts)
            ):
                sampling.append((req_id, request.grammar, drafts))
        return self.structured.bitmask(sampling) if sampling else None

    def _fail_batch(self, scheduler_output, exc: Exception) -> None:
        request_ids = list(scheduler_output.num_scheduled_tokens)
        parents = []
        for request in self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ERROR):
            self.output_processor.mark_finished(request)
            parents.append(request.parent_id)
        for parent in dict.fromkeys(parents):
            group = self.output_processor.groups.get(parent)
            if group is not None:
                self.abort_request(parent)  # its other samples too
        raise BatchFailedError(list(dict.fromkeys(parents)), exc) from exc

    def get_stats(self) -> EngineStats:
        kv = self.kv_cache
        stats = kv.stats
        return EngineStats(
            num_running=self.scheduler.num_active,
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=kv.num_blocks - kv.num_free_blocks,
            kv_blocks_total=kv.num_blocks,
            prefix_cache_hit_rate=stats.hit_rate,
            prefix_cache_queries=stats.prefix_cache_queries,
            prefix_cache_hits=stats.prefix_cache_hits,
            num_preemptions=self.scheduler.stats.num_preemptions,
            num_prompt_tokens=self._num_prompt_tokens,
            num_prompt_tokens_computed=self.scheduler.stats.num_prompt_tokens_computed,
            num_generated_tokens=self._num_generated_tokens,
            num_scheduled_tokens=self.scheduler.stats.num_scheduled_tokens,
            expert_tokens_per_layer=self.executor.expert_load(),
            weight_bytes_per_rank=self._weight_bytes_per_rank,
            spec_decode=self.scheduler.stats.spec if self.proposer is not None else None,
            **self._host_tier_stats(),
        )

    def _host_tier_stats(self) -> dict:
        host = self.kv_cache.host
        if host is None:
            return {}
        stats = host.stats
        moved = stats.blocks_saved + stats.blocks_loaded
        return dict(
            host_kv_blocks_used=host.num_used_slots,
            host_kv_blocks_total=host.num_slots,
            host_kv_hit_tokens=stats.host_hit_tokens,
            host_kv_swapped_in_tokens=stats.swapped_in_tokens,
            host_kv_blocks_saved=stats.blocks_saved,
            host_kv_blocks_loaded=stats.blocks_loaded,
            host_kv_blocks_dropped=stats.blocks_dropped,
            host_kv_bytes_moved=moved * self._host_block_bytes,
            host_kv_load_wait_s=stats.load_wait_s,
        )

    def shutdown(self) -> None:
        self.structured.shutdown()
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None
