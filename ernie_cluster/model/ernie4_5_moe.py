"""Ernie4_5_MoeForCausalLM on flat token batches, tensor- and expert-parallel (the engine's
model).

Input is the step's tokens flattened across sequences: `input_ids` [N], `positions` [N] and an
`AttentionMetadata`. At W > 1 a step runs one of two exact layouts (distributed/layout):
replicated (small steps: every rank holds every row; attention's partial o_proj sums and the
MLP block's partial outputs are each summed by one all-reduce, 2 collectives per layer) or
sharded by TOKENS (rank r holds rows [r*n, (r+1)*n) of the batch padded to W*n; attention
all-gathers and reduce-scatters, the MoE exchanges pairs all-to-all). Embedding and lm_head
are split over the vocabulary. With one rank every collective is an identity and the numerics
are those of the reference implementation.
A dense ERNIE-4.5 checkpoint (`ernie4_5`, the 0.3B: transformers' Ernie4_5ForCausalLM) is this
model with no MoE layer (config/model_config): every layer runs the dense SwiGLU MLP.
Module names mirror the checkpoint's so a weight name greps to its module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernie_cluster import cpu_bf16
from ernie_cluster.attention.backend import AttentionBackend, TorchPagedAttention
from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.distributed.communicator import SINGLE_RANK, Communicator
from ernie_cluster.distributed.layout import choose_replicated
from ernie_cluster.model.attention import Ernie4_5_MoeAttention
from ernie_cluster.model.cpu_head import PackedHead
from ernie_cluster.model.layers import InterleavedRotaryEmbedding, RMSNorm, SwiGLUMLP
from ernie_cluster.model.moe import Ernie4_5_MoeSparseMoeBlock
from ernie_cluster.model.sharding import ShardSpec
from ernie_cluster.model.weights import WeightTarget, rows, whole
from ernie_cluster.quantization.weight import linear


class Ernie4_5_MoeDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ErnieMoeConfig,
        layer_idx: int,
        shard: ShardSpec,
        backend: AttentionBackend,
        rotary: InterleavedRotaryEmbedding,
        dtype: torch.dtype,
        comm: Communicator,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.comm = comm
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Ernie4_5_MoeAttention(config, shard, backend, rotary, dtype)
        # NOTE: the dense MLP is replicated and runs on this rank's tokens: no communication.
        self.mlp: nn.Module = (
            Ernie4_5_MoeSparseMoeBlock(config, shard, dtype, comm)
            if self.is_moe
            else SwiGLUMLP(config.hidden_size, config.intermediate_size, dtype)
        )

    def _forward_replicated(
        self,
        cos_sin: torch.Tensor,
        hidden: torch.Tensor,
        meta: AttentionMetadata,
        is_real: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [N, H]: every token row, the same bits on every rank -> [N, H]. One
        all-reduce sums attention's partial o_proj, one the MLP block's partial outputs."""
        attn = self.self_attn(cos_sin, self.input_layernorm(hidden), meta)  # [N, H] partial
        attn = self.comm.all_reduce(attn)
        normed, hidden = self.post_attention_layernorm.add_and_norm(attn, hidden)  # one kernel
        return hidden + self.comm.all_reduce(self._mlp_partial(normed, is_real))

    def _mlp_partial(self, normed: torch.Tensor, is_real: torch.Tensor | None) -> torch.Tensor:
        """normed [N, H] on every rank -> this rank's share of the MLP block's output [N, H]:
        its own experts' slots of every token (every rank routes every token identically, so
        nothing is dispatched), plus the replicated shared-expert / dense MLP on its block of
        rows (the all-reduce sums each row's block from exactly one rank)."""
        num_tokens = normed.shape[0]
        per_rank = -(-num_tokens // self.comm.world_size)
        start = min(self.comm.rank * per_rank, num_tokens)
        stop = min(start + per_rank, num_tokens)
        if not self.is_moe:
            out = torch.zeros_like(normed)
            out[start:stop] = self.mlp(normed[start:stop])
            return out
        block = self.mlp
        expert_ids, weights = block.gate(normed)  # [N, k] each
        if is_real is not None:  # CUDA-graph padding takes no expert
            expert_ids = torch.where(is_real[:, None], expert_ids, -1)
        out = block.experts.forward_pairs(normed, expert_ids, weights)  # [N, H], own experts
        if block.shared_experts is not None:
            out[start:stop] += block.shared_experts(normed[start:stop])
        return out

    def forward(
        self,
        cos_sin: torch.Tensor,
        hidden: torch.Tensor,
        meta: AttentionMetadata,
        num_valid: int,
        is_real: torch.Tensor | None = None,
        replicated: bool = False,
    ) -> torch.Tensor:
        """cos_sin [N, 2, D/2]: RoPE rows of all N tokens; hidden [n, H]: this rank's token rows
        (the first `num_valid` are tokens of the batch); is_real [n] bool or None: which of them
        are not CUDA-graph padding (padding is routed to no expert). `replicated`: hidden is
        every row [N, H] on every rank (see the module docstring)."""
        if replicated:
            return self._forward_replicated(cos_sin, hidden, meta, is_real)
        num_tokens = cos_sin.shape[0]
        normed = self.comm.all_gather_rows(self.input_layernorm(hidden))[:num_tokens]  # [N, H]
        attn = self.self_attn(cos_sin, normed, meta)  # [N, H] partial over heads
        padding = self.comm.pad_rows(num_tokens) - num_tokens
        if padding:
            attn = F.pad(attn, (0, 0, 0, padding))
        # [n, H] each: the residual add and the norm, one kernel on the GPU path
        normed, hidden = self.post_attention_layernorm.add_and_norm(
            self.comm.reduce_scatter_rows(attn), hidden
        )
        extra = {}
        if self.is_moe:
            real = None if is_real is None else is_real[:num_valid]
            # NOTE: decode steps (the ones captured as graphs) size the MoE exchange for the
            # worst case from hidden.shape[0], the same host int on every rank: no sync.
            # Steps with prefill chunks agree on the exact size with one small all-reduce
            # per MoE layer instead: the worst case would send W times the payload there.
            max_local = hidden.shape[0] if meta.num_prefills == 0 else None
            extra = {"max_local_tokens": max_local, "is_real": real}
        mlp_out = torch.zeros_like(hidden) if num_valid < hidden.shape[0] else None
        if mlp_out is None:
            return hidden + self.mlp(normed, **extra)
        mlp_out[:num_valid] = self.mlp(normed[:num_valid], **extra)
        return hidden + mlp_out

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        return {
            f"{prefix}.input_layernorm.weight": whole(self.input_layernorm.weight.data),
            f"{prefix}.post_attention_layernorm.weight": whole(
                self.post_attention_layernorm.weight.data
            ),
            **self.self_attn.weight_targets(f"{prefix}.self_attn"),
            **self.mlp.weight_targets(f"{prefix}.mlp"),
        }


class Ernie4_5_MoeForCausalLM(nn.Module):
    def __init__(
        self,
        config: ErnieMoeConfig,
        dtype: torch.dtype = torch.bfloat16,
        shard: ShardSpec | None = None,
        backend: AttentionBackend | None = None,
        comm: Communicator | None = None,
    ) -> None:
        super().__init__()
        shard = shard or ShardSpec()
        shard.check(config)
        # NOTE: without a communicator a sharded model still loads (to inspect a rank's
        # weights); only its forward needs the process group.
        comm = comm or (
            SINGLE_RANK if shard.world_size == 1 else Communicator(shard.rank, shard.world_size)
        )
        if (comm.rank, comm.world_size) != (shard.rank, shard.world_size):
            raise ValueError(
                f"communicator rank {comm.rank}/{comm.world_size} does not match shard "
                f"{shard.rank}/{shard.world_size}"
            )
        self.config = config
        self.dtype = dtype
        self.shard = shard
        self.comm = comm
        backend = backend or TorchPagedAttention()
        rotary = InterleavedRotaryEmbedding(
            config.head_dim, config.rope_theta, config.max_position_embeddings
        )
        self.rotary = rotary
        self.vocab_start, self.vocab_stop = shard.vocab(config)
        self.vocab_per_rank = -(-config.vocab_size // shard.world_size)
        local_vocab = self.vocab_stop - self.vocab_start
        self.embed_tokens = nn.Parameter(
            torch.empty(local_vocab, config.hidden_size, dtype=dtype), requires_grad=False
        )
        self.layers = nn.ModuleList(
            Ernie4_5_MoeDecoderLayer(config, i, shard, backend, rotary, dtype, comm)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        # Set by set_num_real_tokens (decode CUDA graphs): rows past it are padding.
        self.mask_padding = False
        # distributed/layout: "auto" picks by step size; tests and benchmarks force one.
        self.collective_layout = "auto"
        # The layout of the last forward (or graph replay): compute_logits reads its rows.
        self.step_replicated = False
        self.register_buffer("num_real_tokens", torch.zeros((), dtype=torch.long), persistent=False)
        self.packed_head = PackedHead()
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Parameter(
                torch.empty(local_vocab, config.hidden_size, dtype=dtype), requires_grad=False
            )
        )

    def set_num_real_tokens(self, num_tokens: int) -> None:
        """Rows past `num_tokens` of the next forwards are CUDA-graph padding: they take no
        expert and count in no expert-load statistic. A device write, no sync; a captured
        graph reads the buffer at every replay."""
        self.mask_padding = True
        self.num_real_tokens.fill_(num_tokens)

    def bind_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        """One cache per layer, each [2, num_slots, local_kv_heads, head_dim]."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} layers")
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            layer.self_attn.kv_cache = cache

    def replicated_layout(self, num_tokens: int) -> bool:
        """Whether a step of `num_tokens` tokens keeps every row on every rank (W > 1)."""
        if self.comm.world_size == 1:
            return False
        cfg = self.config
        return choose_replicated(
            num_tokens,
            self.comm.world_size,
            cfg.hidden_size,
            cfg.moe_k,
            bool(cfg.moe_layer_ids),
            self.collective_layout,
        )

    def _embed(self, input_ids: torch.Tensor, replicated: bool = False) -> torch.Tensor:
        """input_ids [N] -> this rank's token rows [n, H] of the embeddings ([N, H] when
        `replicated`)."""
        if self.comm.world_size == 1:
            return F.embedding(input_ids, self.embed_tokens)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_stop)
        local_ids = (input_ids - self.vocab_start).clamp(0, self.embed_tokens.shape[0] - 1)
        partial = F.embedding(local_ids, self.embed_tokens) * in_range.unsqueeze(-1)  # [N, H]
        if replicated:
            return self.comm.all_reduce(partial)
        padding = self.comm.pad_rows(input_ids.shape[0]) - input_ids.shape[0]
        return self.comm.reduce_scatter_rows(F.pad(partial, (0, 0, 0, padding)))

    def num_local_valid(self, num_tokens: int) -> int:
        rows_per_rank = self.comm.pad_rows(num_tokens) // self.comm.world_size
        return max(0, min(rows_per_rank, num_tokens - self.comm.rank * rows_per_rank))

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids [N], positions [N] -> this rank's final-normed token rows [n, H] (every
        row [N, H] in the replicated layout, see `step_replicated`)."""
        num_tokens = input_ids.shape[0]
        replicated = self.replicated_layout(num_tokens)
        self.step_replicated = replicated
        cos_sin = self.rotary.cos_sin(positions)  # [N, 2, D/2], shared by every layer
        if replicated:
            hidden = self._embed(input_ids, replicated=True)  # [N, H]
            is_real = None
            if self.mask_padding:
                rows = torch.arange(num_tokens, device=hidden.device)
                is_real = rows < self.num_real_tokens  # [N]
            for layer in self.layers:
                hidden = layer(cos_sin, hidden, meta, num_tokens, is_real, replicated=True)
            return self.norm(hidden)
        num_valid = self.num_local_valid(num_tokens)
        hidden = self._embed(input_ids)
        is_real = None
        if self.mask_padding:
            # This rank's rows are global rows [rank * n, rank * n + n).
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            is_real = rows + self.comm.rank * hidden.shape[0] < self.num_real_tokens  # [n]
        for layer in self.layers:
            hidden = layer(cos_sin, hidden, meta, num_valid, is_real)
        return self.norm(hidden)

    @torch.inference_mode()
    def compute_logits(
        self, hidden: torch.Tensor, sample_rows: torch.Tensor
    ) -> torch.Tensor | None:
        """hidden [n, H] from `forward`, global rows to sample [B] -> float32 logits [B, V] on
        rank 0 (None on the other ranks)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        if self.comm.world_size == 1:
            return self._head(hidden[sample_rows], head).float()
        if self.step_replicated:
            selected = hidden[sample_rows]  # [B, H]: every row is here
        else:
            selected = self.comm.all_gather_rows(hidden)[sample_rows]  # [B, H]
        local = self._head(selected, head).float()  # [B, V_local]
        if local.shape[1] < self.vocab_per_rank:
            local = F.pad(local, (0, self.vocab_per_rank - local.shape[1]), value=float("-inf"))
        logits = self.comm.gather_to_first(local, dim=1)  # [B, W * V_per_rank]
        return None if logits is None else logits[:, : self.config.vocab_size]

    def _head(self, hidden: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> [B, V_local] in the model dtype (prepacked on a CPU: model/cpu_head)."""
        if PackedHead.supported(head) and cpu_bf16.cpu_paths():
            return self.packed_head(hidden, head)
        return linear(hidden, head)

    def expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert of each MoE layer on this rank: [moe_layers, experts]."""
        counts = [layer.mlp.experts.tokens_per_expert for layer in self.layers if layer.is_moe]
        if not counts:
            return torch.zeros(0, self.config.moe_num_experts, dtype=torch.long)
        return torch.stack(counts).cpu()

    def weight_targets(self) -> dict[str, WeightTarget]:
        vocab_shape = (self.config.vocab_size, self.config.hidden_size)
        targets = {
            "model.embed_tokens.weight": rows(
                self.embed_tokens.data, vocab_shape, self.vocab_start
            ),
            "model.norm.weight": whole(self.norm.weight.data),
        }
        for i, layer in enumerate(self.layers):
            targets.update(layer.weight_targets(f"model.layers.{i}"))
        if self.lm_head is not None:
            targets["lm_head.weight"] = rows(self.lm_head.data, vocab_shape, self.vocab_start)
        return targets
