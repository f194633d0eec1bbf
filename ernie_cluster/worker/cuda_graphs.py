"""CUDA graphs of the decode forward, one per batch-size bucket, replayed on decode-only steps.

A decode step of B sequences runs the graph of the smallest bucket >= B: the step's inputs are
copied into the graph's static buffers, the rows past B are padding (token 0 at position 0,
writing its K/V into a spare sink block that no request owns, attending to that one key), and
the rows the caller samples are always real ones. Padding rows take no expert (the model's
`num_real_tokens` buffer, set before each replay), so expert-load statistics count only real
tokens. A step of decodes and speculative verifies (no prefill chunk) replays the same graphs
as one decode row per query token (worker/decode_rows), in the bucket >= its token count.
Steps with a prefill chunk, or more rows than the largest bucket, go to the piecewise graphs
(worker/piecewise_graphs) or run eagerly.
At W > 1 every rank captures the same buckets in the same order, so the NCCL collectives
inside the graphs line up (captured only with multi_rank_cuda_graphs, see model_runner).

Attention kernels size their launch grids from host facts; captured graphs see the bound
`max_model_len` as every row's host length, while the device tensors carry the real ones (a
verify row's real length, its position + 1, is within that bound too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.worker.decode_rows import as_decode_rows
from ernie_cluster.worker.input_batch import StepInputs

logger = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, then every 32 up to 256 and every 64 after, capped at
    (and always including) max_num_seqs."""
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64]
    sizes += list(range(96, 257, 32))
    sizes += list(range(320, max(max_num_seqs, 320) + 1, 64))
    buckets = sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})
    return buckets


def smallest_bucket(buckets: list[int], size: int) -> int | None:
    """The first of the ascending `buckets` that holds `size`, or None when none does."""
    for bucket in buckets:
        if bucket >= size:
            return bucket
    return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [padded rows of this rank, H] written by every replay
    host_bytes: dict[str, int]  # the communicator's host-side byte counts of one replay


class DecodeGraphs:
    """Static decode inputs for the largest bucket; each bucket's graph reads a prefix."""

    def __init__(self, runner, buckets: list[int]) -> None:
        self.runner = runner
        self.model = runner.model
        self.buckets = buckets
        batch = runner.input_batch
        self.block_size = batch.block_size
        self.max_len = batch.max_blocks_per_req * batch.block_size
        self.sink_block = runner.num_blocks  # the spare block allocated past the pool
        device, max_b = runner.device, buckets[-1]
        self.input_ids = torch.zeros(max_b, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_b, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(max_b, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(max_b + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_b, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(
            (max_b, batch.max_blocks_per_req), dtype=torch.int32, device=device
        )
        self.graphs: dict[int, _Graph] = {}
        # NOTE: verify rows only under the graph-safe backend (the one capture_graphs takes
        # whole-step graphs for); the other backends' verifies stay on the piecewise path.
        backend = self.model.layers[0].self_attn.backend
        self.runs_verify_rows = getattr(backend, "cuda_graph_safe", False)
        self._pad()
        # Capture with every row counted as padding: no expert load from dummy tokens.
        self.model.set_num_real_tokens(0)

    def _pad(self, start: int = 0) -> None:
        """Rows [start, max) become padding: one key in the sink block."""
        self.input_ids[start:] = 0
        self.positions[start:] = 0
        self.slot_mapping[start:] = self.sink_block * self.block_size
        self.seq_lens[start:] = 1
        self.block_table[start:, 0] = self.sink_block

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_lens=[1] * size,
            seq_lens=[self.max_len] * size,  # host bound only; see the module docstring
            block_size=self.block_size,
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens_tensor=self.seq_lens[:size],
            block_table=self.block_table[:size],
            num_decodes=size,
        )

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self._meta(size))

    @classmethod
    def capture(cls, runner) -> DecodeGraphs:
        buckets = batch_buckets(runner.config.max_num_seqs)
        graphs = cls(runner, buckets)
        device = runner.device
        torch.cuda.synchronize(device)
        free_before, _ = torch.cuda.mem_get_info(device)
        pool = torch.cuda.graph_pool_handle()
        # NOTE: largest first, so the smaller graphs reuse the largest one's memory pool.
        comm = runner.model.comm
        with torch.inference_mode():
            for size in reversed(buckets):
                # NOTE: warm-up (lazy inits, Triton compiles) on a side stream, as PyTorch
                # advises before capturing code with NCCL collectives.
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    graphs._forward(size)
                torch.cuda.current_stream(device).wait_stream(side)
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                before = comm.host_bytes_snapshot()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = graphs._forward(size)
                after = comm.host_bytes_snapshot()
                per_replay = {name: after[name] - before[name] for name in after}
                graphs.graphs[size] = _Graph(graph, hidden, per_replay)
        torch.cuda.synchronize(device)
        free_after, _ = torch.cuda.mem_get_info(device)
        logger.info(
            "captured %d decode CUDA graphs (batch %d..%d): %.1f MiB",
            len(buckets),
            buckets[0],
            buckets[-1],
            (free_before - free_after) / 2**20,
        )
        return graphs

    def bucket_for(self, num_rows: int) -> int | None:
        return smallest_bucket(self.buckets, num_rows)

    def run(self, inputs: StepInputs, decode_and_verify: bool = False) -> torch.Tensor | None:
        """The step's hidden rows from a graph replay, or None when it must run eagerly.
        `decode_and_verify`: the caller's word that every sequence is a decode or a verify
        (worker/decode_rows.is_decode_and_verify), so a step with verifies may replay too."""
        meta = inputs.meta
        if meta.num_decodes != meta.num_seqs:
            if not (decode_and_verify and self.runs_verify_rows):
                return None
            if self.bucket_for(meta.num_tokens) is None:
                return None
            inputs = as_decode_rows(inputs)
            meta = inputs.meta
        num_rows = meta.num_seqs
        if num_rows == 0:
            return None
        size = self.bucket_for(num_rows)
        if size is None:
            return None
        self.input_ids[:num_rows].copy_(inputs.input_ids)
        self.positions[:num_rows].copy_(inputs.positions)
        self.slot_mapping[:num_rows].copy_(meta.slot_mapping)
        self.seq_lens[:num_rows].copy_(meta.seq_lens_tensor)
        columns = meta.block_table.shape[1]
        self.block_table[:num_rows, :columns].copy_(meta.block_table)
        self._pad(num_rows)
        self.model.set_num_real_tokens(num_rows)
        entry = self.graphs[size]
        entry.graph.replay()
        self.model.comm.add_host_bytes(entry.host_bytes)
        # The rows the graph returns are laid out as its bucket's forward laid them out.
        self.model.step_replicated = self.model.replicated_layout(size)
        return entry.hidden
