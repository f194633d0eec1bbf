"""Piecewise CUDA graphs: every step with a prefill chunk (and decodes the whole-step graphs
cannot take) replays the forward as graphs of everything but attention, per token-count
bucket, as vLLM V1 does.

A bucket of T tokens is captured as L + 1 graphs cut at each layer's attention call: piece i
ends with layer i's q, k, v (RoPE applied) and piece i + 1 starts from the attention output.
Between pieces attention runs eagerly with the step's real metadata on the first N <= T rows
of the captured q/k/v, writing into the static output the next piece reads; so any mix of
decodes, prompts and chunks shares a bucket. Rows past N are padding: token 0 at position 0,
its K/V written to the spare sink block, routed to no expert, never sampled. At W > 1 only
buckets whose step runs the replicated layout are captured (no host sync, the same
collectives on every rank in the same order). The communicator's host byte counts of a
bucket's pieces are added per replay, as for the decode graphs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.worker.cuda_graphs import smallest_bucket
from ernie_cluster.worker.input_batch import StepInputs

logger = logging.getLogger(__name__)


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    """8, 16, 32, ... doubling, capped at (and always including) max_num_batched_tokens."""
    sizes, size = [], 8
    while size < max_num_batched_tokens:
        sizes.append(size)
        size *= 2
    return [*sizes, max_num_batched_tokens]


@dataclass
class _AttentionCall:
    """One layer's eager attention between two pieces: reads the captured q/k/v, writes `out`."""

    backend: object
    q: torch.Tensor  # [T, Hq, D] written by the piece before
    k: torch.Tensor  # [T, Hkv, D]
    v: torch.Tensor  # [T, Hkv, D]
    kv_cache: torch.Tensor
    scale: float
    out: torch.Tensor  # [T, Hq, D] read by the piece after

    def run(self, num_tokens: int, meta: AttentionMetadata) -> None:
        n = num_tokens
        attn = self.backend.forward(
            self.q[:n], self.k[:n], self.v[:n], self.kv_cache, meta, self.scale
        )
        self.out[:n].copy_(attn)


@dataclass
class _Bucket:
    pieces: list = field(default_factory=list)  # torch.cuda.CUDAGraph, L + 1 of them
    calls: list[_AttentionCall] = field(default_factory=list)  # L
    hidden: torch.Tensor | None = None  # [T, H] the last piece's output
    host_bytes: dict[str, int] = field(default_factory=dict)


class _CutAtAttention:
    """Stands in for every layer's attention backend while a bucket is captured: ends the
    current piece, hands back a static output, starts the next piece (no attention runs)."""

    def __init__(self, owner: PiecewiseGraphs, backend: object, capture: bool) -> None:
        self.owner, self.backend, self.capture = owner, backend, capture

    def forward(self, q, k, v, kv_cache, meta, scale):
        if not self.capture:  # warm-up: the pieces' kernels, not attention's
            return torch.zeros_like(q)
        return self.owner._cut(self.backend, q, k, v, kv_cache, scale)


class PiecewiseGraphs:
    def __init__(self, runner, buckets: list[int]) -> None:
        self.runner = runner
        self.model = runner.model
        self.buckets = buckets
        self.block_size = runner.input_batch.block_size
        self.sink_slot = runner.num_blocks * self.block_size  # the spare block past the pool
        device, max_t = runner.device, buckets[-1]
        self.input_ids = torch.zeros(max_t, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_t, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_t,), self.sink_slot, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(max_t, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_t + 1, dtype=torch.int32, device=device)
        self.block_table = torch.full(
            (max_t, 1), runner.num_blocks, dtype=torch.int32, device=device
        )
        self.graphs: dict[int, _Bucket] = {}
        self._capturing: _Bucket | None = None
        self._pool = None

    def _meta(self, size: int) -> AttentionMetadata:
        """Capture-time metadata: every row a one-token sequence in the sink block. Only a
        KV write inside a piece would read it (the slots); attention gets the real one."""
        return AttentionMetadata(
            query_lens=[1] * size,
            seq_lens=[1] * size,
            block_size=self.block_size,
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens_tensor=self.seq_lens[:size],
            block_table=self.block_table[:size],
            num_decodes=size,
        )

    def _forward(self, size: int, capture: bool) -> torch.Tensor:
        layers = [layer.self_attn for layer in self.model.layers]
        backends = [attn.backend for attn in layers]
        for attn, backend in zip(layers, backends, strict=True):
            attn.backend = _CutAtAttention(self, backend, capture)
        try:
            return self.model(self.input_ids[:size], self.positions[:size], self._meta(size))
        finally:
            for attn, backend in zip(layers, backends, strict=True):
                attn.backend = backend

    def _begin_piece(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self._pool)
        self._capturing.pieces.append(graph)

    def _cut(self, backend, q, k, v, kv_cache, scale) -> torch.Tensor:
        """End the piece that produced q/k/v, start the next; returns the static attention
        output [T, Hq, D] (allocated between captures, so it is nobody's graph memory)."""
        self._capturing.pieces[-1].capture_end()
        out = torch.zeros_like(q)
        self._capturing.calls.append(_AttentionCall(backend, q, k, v, kv_cache, scale, out))
        self._begin_piece()
        return out

    @classmethod
    def capture(cls, runner) -> PiecewiseGraphs:
        model = runner.model
        buckets = token_buckets(runner.config.max_num_batched_tokens)
        if model.comm.world_size > 1:
            buckets = [t for t in buckets if model.replicated_layout(t)]
        graphs = cls(runner, buckets)
        if not buckets:
            return graphs
        device = runner.device
        graphs._pool = torch.cuda.graph_pool_handle()
        comm = model.comm
        # Capture with every row counted as padding: no expert load from dummy tokens.
        model.set_num_real_tokens(0)
        side = torch.cuda.Stream(device)
        with torch.inference_mode():
            for size in reversed(buckets):  # largest first: the smaller reuse its pool
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    graphs._forward(size, capture=False)  # warm-up: lazy inits, compiles
                    torch.cuda.synchronize(device)
                    bucket = graphs._capturing = _Bucket()
                    before = comm.host_bytes_snapshot()
                    graphs._begin_piece()
                    bucket.hidden = graphs._forward(size, capture=True)
                    bucket.pieces[-1].capture_end()
                    after = comm.host_bytes_snapshot()
                bucket.host_bytes = {name: after[name] - before[name] for name in after}
                graphs.graphs[size] = bucket
                graphs._capturing = None
                torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        logger.info(
            "captured piecewise CUDA graphs for %d token buckets (%d..%d), %d pieces each",
            len(buckets),
            buckets[0],
            buckets[-1],
            len(model.layers) + 1,
        )
        return graphs

    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        """The step's hidden rows from the pieces' replays, or None when it runs eagerly."""
        meta = inputs.meta
        num_tokens = meta.num_tokens
        size = smallest_bucket(self.buckets, num_tokens) if num_tokens else None
        if size is None:
            return None
        if self.model.replicated_layout(num_tokens) != self.model.replicated_layout(size):
            return None
        self.input_ids[:num_tokens].copy_(inputs.input_ids)
        self.positions[:num_tokens].copy_(inputs.positions)
        self.slot_mapping[:num_tokens].copy_(meta.slot_mapping)
        self.input_ids[num_tokens:size] = 0
        self.positions[num_tokens:size] = 0
        self.slot_mapping[num_tokens:size] = self.sink_slot
        self.model.set_num_real_tokens(num_tokens)
        bucket = self.graphs[size]
        for piece, call in zip(bucket.pieces, bucket.calls, strict=False):
            piece.replay()
            call.run(num_tokens, meta)
        bucket.pieces[-1].replay()
        self.model.comm.add_host_bytes(bucket.host_bytes)
        self.model.step_replicated = self.model.replicated_layout(size)
        return bucket.hidden
