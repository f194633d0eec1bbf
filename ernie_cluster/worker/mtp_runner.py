"""The MTP layer of `ernie_mtp` speculative decoding, run on rank 0 after the target's step.

Owns the MTP layer (model/ernie_mtp: `model.mtp_*` weights read from the TARGET checkpoint,
the target's dtype, device and attention backend; the embedding and lm_head are the
target's), its one-layer paged KV cache and, with a host KV tier, its host blocks: the
draft_model arrangement (worker/draft_runner), the target's block count, block size, block
tables and slots. Its slot p holds the MTP's KV of (token p + 1, target hidden state p).

Each step, over the step's very rows (same positions, slots and metadata), it runs with the
target's final-normed hidden states and the step's tokens shifted by one: row p takes the
token at p + 1, which is the next input row's token, or for a sequence's last valid row the
token it just sampled (after a verify: the row of the last accepted token), or the next
prompt token of a prefill chunk that sampled nothing. Rows past a verify's acceptance hold
junk, at positions the next step rewrites. The sampled sequences' last valid rows give the
first greedy proposal; each further one is a one-token step at the next position (a
lookahead slot) with the last proposal and the MTP's own output row. Cost per step: one
one-layer forward over the step's tokens plus max k - 1 one-token ones, eager. Never samples
for the target, never decides who runs; W = 1 only (the target's hidden rows on one rank).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from ernie_cluster.attention.selector import get_attention_backend
from ernie_cluster.config.engine_config import EngineConfig, max_model_len_for
from ernie_cluster.loader.checkpoint_files import weight_map
from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ernie_cluster.model.ernie_mtp import MTP_PREFIX, ErnieMTP
from ernie_cluster.step_io import ModelRunnerOutput, SchedulerOutput
from ernie_cluster.worker.draft_runner import MirroredKVCache
from ernie_cluster.worker.input_batch import StepInputs
from ernie_cluster.worker.step_upload import StepUpload

if TYPE_CHECKING:
    from ernie_cluster.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def load_mtp_model(
    config: EngineConfig,
    model_dir: str | Path,
    target: Ernie4_5_MoeForCausalLM,
    device: torch.device,
    rank: int,
) -> ErnieMTP | None:
    """The MTP layer of `model_dir` on rank 0 (None on other ranks and unless the method is
    ernie_mtp). ValueError on every rank at W > 1, and when the checkpoint has no `mtp_*`."""
    spec = config.speculative_config
    if spec is None or spec.method != "ernie_mtp":
        return None
    if config.world_size != 1:
        raise ValueError(
            f"ernie_mtp runs with tensor_parallel_size 1 only, got {config.world_size}: the "
            "MTP layer reads the target's hidden rows on one rank"
        )
    if rank != 0:
        return None
    files = weight_map(Path(model_dir))
    if not any(name.startswith(MTP_PREFIX) for name in files):
        raise ValueError(
            f"the checkpoint {model_dir} has no mtp_* weights (model.mtp_block.0.*, "
            "model.mtp_linear_proj.0.weight, ...): ernie_mtp needs a checkpoint that carries "
            "its MTP layer (ERNIE-4.5 PT checkpoints do; the Thinking checkpoint does not)"
        )
    backend = get_attention_backend(config.attention_backend, device)
    with torch.device(device):
        mtp = ErnieMTP(target.config, target.dtype, backend)
    targets = mtp.weight_targets()
    missing = sorted(set(targets) - set(files))
    if missing:
        raise ValueError(
            f"the checkpoint {model_dir} lacks MTP tensor {missing[0]!r} "
            f"({len(missing)} of {len(targets)} missing)"
        )
    by_file: dict[str, list[str]] = defaultdict(list)
    for name in targets:
        by_file[str(files[name])].append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(file, framework="pt") as handle:
            for name in names:
                tensor = handle.get_tensor(name)
                dest = targets[name].dest
                if tuple(tensor.shape) != targets[name].full_shape or dest is None:
                    raise ValueError(
                        f"MTP tensor {name!r} of {model_dir} has shape {list(tensor.shape)}, "
                        f"expected {list(targets[name].full_shape)}"
                    )
                dest.copy_(tensor)
    mtp.rotary.extend(max_model_len_for(config.max_model_len, target.config))
    logger.info(
        "ernie_mtp: MTP layer of %s, %.1f M parameters, on rank 0",
        model_dir,
        sum(p.numel() for p in mtp.parameters()) / 1e6,
    )
    return mtp


def step_order(out: SchedulerOutput) -> list[str]:
    """The step's sequences in the order of its flattened rows (ModelRunner._prepare's:
    one-token sequences first)."""
    scheduled = out.num_scheduled_tokens
    return [r for r, n in scheduled.items() if n == 1] + [r for r, n in scheduled.items() if n != 1]


class MTPRunner(MirroredKVCache):
    """ernie_mtp's proposals, from the MTP layer's mirrored cache (module docstring)."""

    def _shifted_fixes(
        self,
        target: ModelRunner,
        inputs: StepInputs,
        out: SchedulerOutput,
        sampled: dict[str, list[int]],
    ) -> tuple[list[int], list[int], dict[str, int]]:
        """Rows whose next token is not the next input row's, with their tokens, and the last
        valid row of each sequence that sampled."""
        order = step_order(out)
        query_lens = [out.num_scheduled_tokens[r] for r in order]
        if query_lens != list(inputs.meta.query_lens):
            raise RuntimeError("ernie_mtp: the step's row order differs from the runner's")
        fix_rows: list[int] = []
        fix_tokens: list[int] = []
        last_rows: dict[str, int] = {}
        offset = 0
        for req_id, num in zip(order, query_lens, strict=True):
            state = target.requests[req_id]
            tokens = sampled.get(req_id)
            if tokens:
                num_drafts = len(out.spec_token_ids.get(req_id, ()))
                row = offset + num - 1 - num_drafts + len(tokens) - 1
                fix_rows.append(row)
                fix_tokens.append(state.token_ids[-1])
                last_rows[req_id] = row
            else:  # a prefill chunk short of the prompt's end: the next prompt token
                nxt = state.num_computed_tokens
                fix_rows.append(offset + num - 1)
                fix_tokens.append(state.token_ids[nxt] if nxt < len(state.token_ids) else 0)
            offset += num
        return fix_rows, fix_tokens, last_rows

    @torch.inference_mode()
    def propose(
        self,
        target: ModelRunner,
        inputs: StepInputs,
        out: SchedulerOutput,
        result: ModelRunnerOutput,
        hidden: torch.Tensor | None = None,
    ) -> dict[str, list[int]]:
        """Mirror the step in the MTP's cache, then the greedy proposals of each sequence with
        lookahead room that sampled this step. `hidden`: the target's final-normed rows."""
        if hidden is None:
            raise RuntimeError("ernie_mtp needs the target's hidden states of the step")
        target_model = target.model
        num_rows = inputs.input_ids.shape[0]
        sampled = result.sampled_token_ids
        fix_rows, fix_tokens, last_rows = self._shifted_fixes(target, inputs, out, sampled)
        chosen = [
            (num, req_id) for req_id, num in out.num_lookahead_tokens.items() if req_id in last_rows
        ]
        # NOTE: most proposals first: one-token step j runs the sequences [0, sizes[j]).
        chosen.sort(key=lambda entry: -entry[0])
        counts = np.array([num for num, _ in chosen], dtype=np.int64)  # [B]
        states = [target.requests[req_id] for _, req_id in chosen]
        # The last valid row's position: the sampled token's, less one.
        last = np.array([len(state.token_ids) - 2 for state in states], dtype=np.int64)  # [B]
        sizes = [int((counts > j).sum()) for j in range(1, int(counts.max(initial=1)))]
        seq_of = np.concatenate([np.arange(size) for size in sizes] + [np.zeros(0, np.int64)])
        positions = last[seq_of] + np.repeat(np.arange(1, len(sizes) + 1), sizes)  # [T]
        batch_rows = np.array([state.row for state in states], dtype=np.int64)  # [B]
        table = target.input_batch.block_table_host
        blocks = table[batch_rows[seq_of], positions // self.block_size]
        slots = blocks * self.block_size + positions % self.block_size  # [T]
        upload = StepUpload()
        parts = [
            upload.ints(part)
            for part in (
                fix_rows,
                fix_tokens,
                [last_rows[req_id] for _, req_id in chosen],
                batch_rows,
                positions,
                slots,
            )
        ]
        upload.send(self.device)
        fix_rows_d, fix_tokens_d, first_rows_d, rows_d, positions_d, slots_d = (
            upload[part] for part in parts
        )
        next_ids = torch.roll(inputs.input_ids, -1)  # [N]: the next input row's token
        next_ids[fix_rows_d] = fix_tokens_d
        out_rows = self.model(
            F.embedding(next_ids, target_model.embed_tokens),
            inputs.positions,
            hidden[:num_rows],
            inputs.meta,
        )  # [N, H]
        if not chosen:
            return {}
        steps = torch.arange(len(chosen) + 1, device=self.device)  # [B + 1]
        mtp_hidden = out_rows[first_rows_d]  # [B, H]
        tokens = target_model.compute_logits(mtp_hidden, steps[:-1]).argmax(-1)  # [B]
        proposals = torch.empty((len(chosen), len(sizes) + 1), dtype=torch.long, device=self.device)
        proposals[:, 0] = tokens
        if sizes:
            num_columns = -(-int((last + counts).max()) // self.block_size)
            block_table = target.input_batch.block_table[:, :num_columns].index_select(0, rows_d)
        offset = 0
        for j, size in enumerate(sizes, start=1):
            step_positions = positions_d[offset : offset + size]  # [b]
            seq_lens = (last[:size] + j + 1).tolist()
            slots = slots_d[offset : offset + size]
            meta = self.one_token_meta(step_positions, slots, seq_lens, block_table, steps)
            embeds = F.embedding(tokens[:size], target_model.embed_tokens)  # [b, H]
            mtp_hidden = self.model(embeds, step_positions, mtp_hidden[:size], meta)  # [b, H]
            tokens = target_model.compute_logits(mtp_hidden, steps[:size]).argmax(-1)  # [b]
            proposals[:size, j] = tokens
            offset += size
        drafted = proposals.tolist()  # the one device->host copy of the proposals
        return {req_id: drafted[i][:num] for i, (num, req_id) in enumerate(chosen)}
