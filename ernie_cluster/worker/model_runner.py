"""Runs one scheduled step on this rank's model: inputs from the diff, forward, sampling.

Keeps the per-request state a worker needs between steps (token ids, block table, computed
count, sampling state) so the driver only sends diffs. Builds the flat token batch and its
attention metadata, runs the model and samples the rows whose sequences reached their end.
Never decides who runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ernie_cluster.sample import Sampler, SamplingState


@dataclass
class CachedRequestState:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingState


def allocate_kv_caches(
    model: Ernie4_5_MoeForCausalLM, num_blocks: int, block_size: int, device: torch.device | str
) -> list[torch.Tensor]:
    attn = model.layers[0].self_attn
    shape = (2, num_blocks * block_size, attn.num_kv_heads, attn.head_dim)
    return [torch.zeros(shape, dtype=model.dtype, device=device) for _ in model.layers]


class ModelRunner:
    def __init__(
        self,
        model: Ernie4_5_MoeForCausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self.kv_caches = allocate_kv_caches(model, num_blocks, block_size, self.device)
        model.bind_kv_caches(self.kv_caches)
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}

    def update_states(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in out.new_requests:
            self.requests[new.req_id] = CachedRequestState(
                token_ids=list(new.prompt_token_ids),
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                sampling=SamplingState.create(
                    new.params,
                    new.prompt_token_ids,
                    new.stop_token_ids,
                    sample_index=new.sample_index,
                    device=self.device,
                ),
            )
        for cached in out.cached_requests:
            state = self.requests[cached.req_id]
            if cached.resumed:
                state.block_ids = list(cached.new_block_ids)
            else:
                state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.update_states(out)
        if out.is_empty:
            return ModelRunnerOutput()
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens, context_lens, block_tables = [], [], []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        for req_id, num_new in out.num_scheduled_tokens.items():
            state = self.requests[req_id]
            start = state.num_computed_tokens
            stop = start + num_new
            input_ids.extend(state.token_ids[start:stop])
            positions.extend(range(start, stop))
            query_lens.append(num_new)
            context_lens.append(stop)
            block_tables.append(state.block_ids)
            state.num_computed_tokens = stop
            if stop == len(state.token_ids):
                sample_rows.append(len(input_ids) - 1)
                sample_ids.append(req_id)

        meta = AttentionMetadata.build(
            query_lens, context_lens, block_tables, self.block_size, self.device
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, meta)  # [N, H]
        if not sample_rows:
            return ModelRunnerOutput()
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden, rows)  # [B, V] float32 on rank 0
        result = ModelRunnerOutput()
        comm = self.model.comm
        if comm.is_first:
            states = [self.requests[r].sampling for r in sample_ids]
            sampled = self.sampler(logits, states)
            tokens = torch.tensor(sampled.token_ids, dtype=torch.long, device=self.device)
            for req_id, logprobs in zip(sample_ids, sampled.logprobs, strict=True):
                if logprobs is not None:
                    result.logprobs[req_id] = logprobs
        else:
            tokens = torch.empty(len(sample_ids), dtype=torch.long, device=self.device)
        # Every rank needs the sampled tokens as the next step's inputs.
        token_list = comm.broadcast_from_first(tokens).tolist()
        for req_id, token in zip(sample_ids, token_list, strict=True):
            state = self.requests[req_id]
            state.token_ids.append(token)
            state.sampling.output_token_ids.append(token)
            result.sampled_token_ids[req_id] = token
        return result
