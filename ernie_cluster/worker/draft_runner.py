"""The draft model of `draft_model` speculative decoding, run on rank 0 beside the target.

Owns the draft (the target's loader, dtype, device and attention backend, unsharded: W = 1
shapes whatever the target's sharding), its paged KV cache and, with a host KV tier, its host
blocks. The cache has the target's block count and block size and is addressed by the
target's block tables and slot mapping, so prefix caching, preemption, block reuse and the host
tier need no second block manager. It stays valid because each step the draft first runs over
exactly the tokens the target ran (the same flattened inputs: prefill chunks, decodes, verify
rows): every slot the target computed then holds the draft's KV of the same token. Then, for
each sequence that sampled and has lookahead slots (`SchedulerOutput.num_lookahead_tokens`),
it feeds the sequence's last new token and takes n greedy one-token steps, batched over
sequences; their KV lands in the lookahead slots and the next step's mirror forward rewrites
whatever the target computes there. Cost per step: one draft forward over the step's tokens
plus max n one-token forwards, eagerly (no CUDA graphs for the draft yet); one host->device
copy and one device->host copy of the proposals. Never samples for the target, never decides
who runs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from ernie_cluster.attention.kv_quant import kv_cache_torch_dtype
from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.attention.selector import get_attention_backend
from ernie_cluster.config.engine_config import EngineConfig, max_model_len_for
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.loader.checkpoint_files import resolve_model_path
from ernie_cluster.loader.model_loader import load_model
from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ernie_cluster.model.sharding import ShardSpec
from ernie_cluster.step_io import ModelRunnerOutput, SchedulerOutput
from ernie_cluster.worker.input_batch import StepInputs
from ernie_cluster.worker.kv_offload import HostKVPool
from ernie_cluster.worker.model_runner import allocate_kv_caches
from ernie_cluster.worker.step_upload import StepUpload

if TYPE_CHECKING:
    from ernie_cluster.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def load_draft_model(
    config: EngineConfig, target: Ernie4_5_MoeForCausalLM, device: torch.device
) -> Ernie4_5_MoeForCausalLM | None:
    """The draft of `config.speculative_config` (None unless its method is draft_model),
    loaded unsharded in the target's dtype; ValueError when its vocabulary differs."""
    spec = config.speculative_config
    if spec is None or spec.method != "draft_model" or spec.model is None:
        return None
    path = resolve_model_path(spec.model)
    draft_config = ErnieMoeConfig.from_pretrained(path)
    if draft_config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"the draft model {spec.model!r} has a vocabulary of {draft_config.vocab_size} "
            f"tokens, the target {target.config.vocab_size}: draft_model needs a checkpoint "
            "with the target's tokenizer"
        )
    draft = load_model(
        path,
        dtype=target.dtype,
        shard=ShardSpec(0, 1),
        device=device,
        config=draft_config,
        show_progress=False,
        backend=get_attention_backend(config.attention_backend, device),
        kv_cache_dtype=config.kv_cache_dtype,
    )
    draft.rotary.extend(max_model_len_for(config.max_model_len, target.config))
    logger.info(
        "draft model %s: %d layers, %.1f M parameters, on rank 0",
        spec.model,
        len(draft.layers),
        sum(p.numel() for p in draft.parameters()) / 1e6,
    )
    return draft


class MirroredKVCache:
    """A proposing model's paged KV cache on the target's blocks (this module's docstring):
    the target's block count and block size plus its spare block, so both caches have the
    same slots, and with a host tier its own host pool of the target's slots."""

    def __init__(self, model: torch.nn.Module, target: ModelRunner) -> None:
        self.model = model
        self.block_size = target.block_size
        self.device = target.device
        cache_dtype = kv_cache_torch_dtype(target.config.kv_cache_dtype, model.dtype)
        # NOTE: allocate_kv_caches reads only the model's `layers` and `dtype`.
        self.kv_caches = allocate_kv_caches(
            model, target.num_blocks + 1, self.block_size, self.device, cache_dtype
        )
        model.bind_kv_caches(self.kv_caches)
        self.kv_offload: HostKVPool | None = None
        if target.kv_offload is not None:
            num_host_blocks = target.kv_offload.num_host_blocks
            self.kv_offload = HostKVPool(self.kv_caches, self.block_size, num_host_blocks)

    def copy_blocks(self, out: SchedulerOutput) -> None:
        """The step's host-tier copies, on this cache's blocks (the target's own run beside)."""
        if self.kv_offload is not None:
            self.kv_offload.execute(out.kv_saves, out.kv_loads)

    def one_token_meta(
        self,
        positions: torch.Tensor,
        slots: torch.Tensor,
        seq_lens: list[int],
        block_table: torch.Tensor,
        steps: torch.Tensor,
    ) -> AttentionMetadata:
        """A proposal step of one token per sequence: positions [b], slots [b], host lengths
        [b], block_table [>= b, columns] (row i the i-th sequence's), steps arange(>= b + 1)."""
        size = positions.shape[0]
        return AttentionMetadata(
            query_lens=[1] * size,
            seq_lens=seq_lens,
            block_size=self.block_size,
            slot_mapping=slots,
            query_start_loc=steps[: size + 1].to(torch.int32),
            seq_lens_tensor=(positions + 1).to(torch.int32),
            block_table=block_table[:size],
            num_decodes=size,
        )


class DraftRunner(MirroredKVCache):
    @torch.inference_mode()
    def propose(
        self,
        target: ModelRunner,
        inputs: StepInputs,
        out: SchedulerOutput,
        result: ModelRunnerOutput,
        hidden: torch.Tensor | None = None,
    ) -> dict[str, list[int]]:
        """Mirror the target's step in the draft's cache, then the proposals of each sequence
        with lookahead slots that sampled this step (its new tokens are in `target`'s state).
        `hidden` (the target's rows, which ernie_mtp reads) is unused: the draft has its own."""
        self.model(inputs.input_ids, inputs.positions, inputs.meta)  # KV only: [N, H] dropped
        chosen = [
            (num, req_id)
            for req_id, num in out.num_lookahead_tokens.items()
            if req_id in result.sampled_token_ids
        ]
        if not chosen:
            return {}
        # NOTE: most proposals first: one-token step j runs the sequences [0, sizes[j]).
        chosen.sort(key=lambda entry: -entry[0])
        counts = np.array([num for num, _ in chosen], dtype=np.int64)  # [B]
        states = [target.requests[req_id] for _, req_id in chosen]
        rows = np.array([state.row for state in states], dtype=np.int64)  # [B]
        first = np.array([len(state.token_ids) - 1 for state in states], dtype=np.int64)  # [B]
        sizes = [int((counts > j).sum()) for j in range(int(counts[0]))]
        seq_of = np.concatenate([np.arange(size) for size in sizes])  # [T] over all steps
        positions = first[seq_of] + np.repeat(np.arange(len(sizes)), sizes)  # [T]
        table = target.input_batch.block_table_host
        blocks = table[rows[seq_of], positions // self.block_size]
        slots = blocks * self.block_size + positions % self.block_size  # [T]
        upload = StepUpload()
        parts = [
            upload.ints(part)
            for part in ([state.token_ids[-1] for state in states], rows, positions, slots)
        ]
        upload.send(self.device)
        tokens, rows_d, positions_d, slots_d = (upload[part] for part in parts)
        num_columns = -(-int((first + counts).max()) // self.block_size)
        block_table = target.input_batch.block_table[:, :num_columns].index_select(0, rows_d)
        steps = torch.arange(len(chosen) + 1, device=self.device)  # [B + 1]
        proposals = torch.empty((len(chosen), len(sizes)), dtype=torch.long, device=self.device)
        offset = 0
        for j, size in enumerate(sizes):
            step_positions = positions_d[offset : offset + size]  # [b]
            seq_lens = (first[:size] + j + 1).tolist()
            slots = slots_d[offset : offset + size]
            meta = self.one_token_meta(step_positions, slots, seq_lens, block_table, steps)
            hidden = self.model(tokens[:size], step_positions, meta)  # [b, H]
            tokens = self.model.compute_logits(hidden, steps[:size]).argmax(-1)  # [b]
            proposals[:size, j] = tokens
            offset += size
        drafted = proposals.tolist()  # the draft's one device->host copy
        return {req_id: drafted[i][:num] for i, (num, req_id) in enumerate(chosen)}
