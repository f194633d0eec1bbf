"""Runs one scheduled step on this rank's model: inputs from the diff, forward, sampling.

Keeps the per-request state a worker needs between steps (token ids, computed count,
sampling state, and a row of the persistent device batch holding its block table) so the
driver only sends diffs. A step is one packed host->device copy of its inputs
(worker/input_batch), the forward, sampling on rank 0 (under the step's grammar bitmask, if any), and one device->host copy of the
sampled tokens (plus logprobs when asked); nothing else reads the device back (prompt logprobs,
when a request asks, add one copy: worker/prompt_logprobs). Steps replay
CUDA graphs when they were captured: whole decode steps, speculative verifies among them
(worker/cuda_graphs), every other step piecewise (worker/piecewise_graphs). Never decides who
runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ernie_cluster.attention.kv_quant import kv_cache_torch_dtype, layer_kv_scales, set_kv_scales
from ernie_cluster.config.engine_config import EngineConfig, max_model_len_for
from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ernie_cluster.sample import Sampler, SamplingState
from ernie_cluster.sample.grammar_mask import apply_grammar_bitmask
from ernie_cluster.sample.sampling_state import record_sampled
from ernie_cluster.sample.speculative import accepted_rows
from ernie_cluster.step_io import GrammarBitmask, ModelRunnerOutput, SchedulerOutput
from ernie_cluster.worker import prompt_logprobs
from ernie_cluster.worker.decode_rows import is_decode_and_verify
from ernie_cluster.worker.input_batch import InputBatch, StepInputs
from ernie_cluster.worker.kv_offload import HostKVPool

if TYPE_CHECKING:
    from ernie_cluster.worker.draft_runner import DraftRunner
    from ernie_cluster.worker.mtp_runner import MTPRunner

logger = logging.getLogger(__name__)


@dataclass
class CachedRequestState:
    token_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingState
    row: int
    """Row of the persistent batch (its block table) held until the request finishes."""
    num_prompt_logprobs: int | None = None
    """`params.prompt_logprobs` of the first sample of a request that asks; None: none."""
    prompt_logprobs_done: int = 0
    """Positions whose prompt logprobs were reported (a recompute reports nothing twice)."""


def allocate_kv_caches(
    model: Ernie4_5_MoeForCausalLM,
    num_blocks: int,
    block_size: int,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """One zeroed cache per layer, each [2, num_blocks * block_size, kv_heads, head_dim] in
    `dtype` (default: the model's; fp8 caches carry their layer's scales, attention/kv_quant)."""
    attn = model.layers[0].self_attn
    shape = (2, num_blocks * block_size, attn.num_kv_heads, attn.head_dim)
    caches = []
    for layer in model.layers:
        cache = torch.zeros(shape, dtype=dtype or model.dtype, device=device)
        set_kv_scales(cache, *layer_kv_scales(layer.self_attn))
        caches.append(cache)
    return caches


class ModelRunner:
    def __init__(
        self,
        model: Ernie4_5_MoeForCausalLM,
        num_blocks: int,
        config: EngineConfig,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.config = config
        self.block_size = config.block_size
        self.device = torch.device(device)
        self.num_blocks = num_blocks
        cache_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, model.dtype)
        # NOTE: one spare block past the pool: CUDA-graph padding rows write their K/V there.
        self.kv_caches = allocate_kv_caches(
            model, num_blocks + 1, self.block_size, self.device, cache_dtype
        )
        logger.info(
            "KV cache: %d blocks of %d tokens in %s, %.2f GiB",
            num_blocks,
            self.block_size,
            str(cache_dtype).removeprefix("torch."),
            sum(c.numel() * c.element_size() for c in self.kv_caches) / 2**30,
        )
        model.bind_kv_caches(self.kv_caches)
        self.kv_offload = HostKVPool.sized(
            self.kv_caches, self.block_size, config.kv_offload_gb, config.num_host_kv_blocks
        )
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}
        max_model_len = max_model_len_for(config.max_model_len, model.config)
        self.input_batch = InputBatch(
            max_num_reqs=config.max_num_seqs,
            max_blocks_per_req=-(-max_model_len // self.block_size),
            block_size=self.block_size,
            device=self.device,
        )
        self.cuda_graphs = None
        self.piecewise_graphs = None
        self.prompt_plan: prompt_logprobs.PromptLogprobsPlan | None = None
        """The last prepared step's prompt-logprob rows (None: no request asked)."""
        self.draft: DraftRunner | MTPRunner | None = None
        """draft_model or ernie_mtp on rank 0: mirrors each step in its own cache, then
        proposes."""

    def capture_cuda_graphs(self) -> None:
        """Capture the step graphs (CUDA only, unless enforce_eager; at W > 1 only when asked)."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        world = self.model.comm.world_size
        if world > 1 and not self.config.multi_rank_cuda_graphs:
            # NOTE: no multi-GPU run has yet replayed a W > 1 graph (NCCL collectives under
            # capture) and matched eager; until one has, W > 1 runs eagerly by default.
            logger.info("W = %d: steps run eagerly (multi_rank_cuda_graphs is off)", world)
            return
        self.capture_graphs()

    def capture_graphs(self) -> None:
        """Whole decode-step graphs per batch bucket (graph-safe attention backends only),
        then piecewise graphs of every step per token bucket (worker/piecewise_graphs)."""
        from ernie_cluster.worker.cuda_graphs import DecodeGraphs
        from ernie_cluster.worker.piecewise_graphs import PiecewiseGraphs

        backend = self.model.layers[0].self_attn.backend
        if getattr(backend, "cuda_graph_safe", False):
            self.cuda_graphs = DecodeGraphs.capture(self)
        else:
            # NOTE: the torch reference sizes its decode gather from host lengths, which a
            # whole-step graph would freeze at max_model_len; the pieces run it eagerly.
            logger.info("attention backend %s: decode runs piecewise", type(backend).__name__)
        self.piecewise_graphs = PiecewiseGraphs.capture(self)

    def update_states(self, out: SchedulerOutput) -> None:
        batch = self.input_batch
        for req_id in out.finished_req_ids:
            state = self.requests.pop(req_id, None)
            if state is not None:
                batch.free_row(state.row)
        for new in out.new_requests:
            if new.req_id in self.requests:  # re-sent after a failed step: start over
                batch.free_row(self.requests.pop(new.req_id).row)
            self.requests[new.req_id] = CachedRequestState(
                token_ids=list(new.prompt_token_ids),
                num_computed_tokens=new.num_computed_tokens,
                sampling=SamplingState.create(
                    new.params,
                    new.prompt_token_ids,
                    new.stop_token_ids,
                    sample_index=new.sample_index,
                    device=self.device,
                ),
                row=batch.add_row(list(new.block_ids)),
                # NOTE: the n samples of a request share its prompt: the first one reports.
                num_prompt_logprobs=new.params.prompt_logprobs if new.sample_index == 0 else None,
            )
        for cached in out.cached_requests:
            state = self.requests[cached.req_id]
            if cached.resumed:
                batch.reset_blocks(state.row, list(cached.new_block_ids))
            else:
                if cached.num_kept_blocks is not None:
                    batch.truncate_blocks(state.row, cached.num_kept_blocks)
                batch.append_blocks(state.row, list(cached.new_block_ids))
            state.num_computed_tokens = cached.num_computed_tokens

    def _prepare(self, out: SchedulerOutput) -> tuple[StepInputs, list[str]]:
        """Host arrays of the step in batch order (decodes first), uploaded once, and the
        request of each sampled row (a speculative request samples its 1 + k positions, in
        consecutive rows); `self.prompt_plan`: the rows whose prompt logprobs the step
        reports (None: no request asks)."""
        scheduled = out.num_scheduled_tokens
        # NOTE: decodes first, so attention backends see them as one block of rows.
        order = [r for r, n in scheduled.items() if n == 1]
        num_decodes = len(order)
        order += [r for r, n in scheduled.items() if n != 1]
        num_seqs = len(order)
        rows = np.empty(num_seqs, dtype=np.int64)
        query_lens = np.empty(num_seqs, dtype=np.int64)
        seq_lens = np.empty(num_seqs, dtype=np.int64)
        input_ids: list[int] = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        prompt_plan = None
        for i, req_id in enumerate(order):
            state = self.requests[req_id]
            start = state.num_computed_tokens
            stop = start + scheduled[req_id]
            if state.num_prompt_logprobs is not None:
                prompt_plan = self._plan_prompt_logprobs(
                    prompt_plan, req_id, state, start, stop, len(input_ids)
                )
            drafts = out.spec_token_ids.get(req_id, ())
            input_ids.extend(state.token_ids[start : stop - len(drafts)])
            input_ids.extend(drafts)
            rows[i], query_lens[i], seq_lens[i] = state.row, stop - start, stop
            state.num_computed_tokens = stop
            # NOTE: max_tokens = 0 (prompt logprobs only): the request ends after its prompt.
            samples = state.sampling.params.max_tokens != 0  # None: the model's default
            if stop == len(state.token_ids) + len(drafts) and samples:
                first = len(input_ids) - 1 - len(drafts)
                sample_rows.extend(range(first, len(input_ids)))
                sample_ids.extend([req_id] * (1 + len(drafts)))
        inputs = self.input_batch.prepare(
            rows,
            query_lens,
            seq_lens,
            np.asarray(input_ids, dtype=np.int64),
            np.asarray(sample_rows, dtype=np.int64),
            num_decodes,
        )
        self.prompt_plan = prompt_plan
        return inputs, sample_ids

    @staticmethod
    def _plan_prompt_logprobs(
        plan: prompt_logprobs.PromptLogprobsPlan | None,
        req_id: str,
        state: CachedRequestState,
        start: int,
        stop: int,
        first_row: int,
    ) -> prompt_logprobs.PromptLogprobsPlan | None:
        """Add the rows of positions [start, stop) (packed from `first_row` on) that predict
        a prompt token not yet reported."""
        num_prompt = len(state.sampling.prompt_token_ids)
        lo, hi = prompt_logprobs.plan_rows(start, stop, num_prompt, state.prompt_logprobs_done)
        if lo == hi:
            return plan
        plan = plan or prompt_logprobs.PromptLogprobsPlan()
        rows = range(first_row + lo - start, first_row + hi - start)
        plan.add(req_id, rows, state.token_ids[lo + 1 : hi + 1], state.num_prompt_logprobs or 0)
        state.prompt_logprobs_done = hi
        return plan

    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        if self.kv_offload is not None:  # host KV tier copies (worker/kv_offload.py)
            self.kv_offload.execute(out.kv_saves, out.kv_loads)
        if self.draft is not None:
            self.draft.copy_blocks(out)
        self.update_states(out)
        if out.is_empty:
            return ModelRunnerOutput()
        inputs, sample_ids = self._prepare(out)
        prompt_plan = self.prompt_plan
        hidden = None
        if self.cuda_graphs is not None:  # decodes, and verifies as decode rows
            hidden = self.cuda_graphs.run(inputs, is_decode_and_verify(out))
        if hidden is None and self.piecewise_graphs is not None:
            hidden = self.piecewise_graphs.run(inputs)
        if hidden is None:
            if self.model.mask_padding:  # graphs were captured: eager steps have no padding
                self.model.set_num_real_tokens(inputs.meta.num_tokens)
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)  # [n, H]
        result = ModelRunnerOutput()
        if prompt_plan is not None:
            result.prompt_logprobs = prompt_logprobs.compute(self.model, hidden, prompt_plan)
        if sample_ids:
            logits = self.model.compute_logits(hidden, inputs.sample_rows)  # [S, V] on rank 0
            self._sample(logits, sample_ids, out.grammar, result, out.spec_token_ids)
        if self.draft is not None:  # worker/draft_runner, worker/mtp_runner
            result.draft_token_ids = self.draft.propose(self, inputs, out, result, hidden)
        return result

    def _sample(
        self,
        logits: torch.Tensor | None,
        sample_ids: list[str],
        grammar: GrammarBitmask | None = None,
        result: ModelRunnerOutput | None = None,
        spec_token_ids: dict[str, list[int]] | None = None,
    ) -> ModelRunnerOutput:
        """Sample every row of `logits` [S, V] (rank 0), share the tokens with the other ranks,
        and keep each request's new tokens: its one sampled token, or with proposals the
        accepted ones and the token sampled after them (sample/speculative)."""
        result = result or ModelRunnerOutput()
        comm = self.model.comm
        sampled = None
        if comm.is_first:
            if grammar is not None:
                apply_grammar_bitmask(logits, grammar, sample_ids)
            sampled = self.sampler(logits, [self.requests[r].sampling for r in sample_ids])
            tokens = sampled.token_ids
        else:
            tokens = torch.empty(len(sample_ids), dtype=torch.long, device=self.device)
        # Every rank needs the sampled tokens as the next step's inputs.
        tokens = comm.broadcast_from_first(tokens)
        if sampled is not None:
            token_list, logprobs = sampled.to_host()  # the step's one device->host copy
        else:
            token_list, logprobs = tokens.tolist(), [None] * len(sample_ids)
        # Every rank decides acceptance from the same tokens and proposals: no extra sync.
        kept = accepted_rows(sample_ids, token_list, spec_token_ids or {})
        # NOTE: rank 0 keeps penalised requests' output histories on the device, appended
        # from the sampled tokens there; the other ranks never sample, keep them on the host.
        record_sampled(
            [self.requests[sample_ids[row]].sampling for row in kept],
            tokens,
            [token_list[row] for row in kept],
            sampled is not None,
            rows=kept,
        )
        for row in kept:
            req_id, token = sample_ids[row], token_list[row]
            state = self.requests[req_id]
            state.token_ids.append(token)
            result.sampled_token_ids.setdefault(req_id, []).append(token)
            if logprobs[row] is not None:
                result.logprobs.setdefault(req_id, []).append(logprobs[row])
        for req_id, drafts in (spec_token_ids or {}).items():
            if req_id in result.sampled_token_ids:
                rejected = len(drafts) + 1 - len(result.sampled_token_ids[req_id])
                self.requests[req_id].num_computed_tokens -= rejected
        if sampled is not None and sampled.generator_states:
            self._rewind_generators(sample_ids, kept, sampled.generator_states)
        return result

    def _rewind_generators(
        self, sample_ids: list[str], kept: list[int], states: dict[int, torch.Tensor]
    ) -> None:
        """A seeded speculative sequence drew noise for all its 1 + k rows; rewind its
        generator to just after its last kept row. Row i then draws what a plain run draws for
        that position, so a seed gives the same tokens with and without speculation."""
        last_kept: dict[str, int] = {}
        for row in kept:
            last_kept[sample_ids[row]] = row
        for req_id, row in last_kept.items():
            state = states.get(row)
            generator = self.requests[req_id].sampling.generator
            if state is not None and generator is not None:
                generator.set_state(state)
