"""Which slice of the model one rank owns: attention heads, experts and vocabulary rows.

Pure arithmetic on the config; no tensors and no communication. Both the model constructor
(to size its parameters) and the loader (to read only the owned slices) use it, so a rank never
materialises weights it does not own.
"""

from __future__ import annotations

from dataclasses import dataclass

from ernie_cluster.config.model_config import ErnieMoeConfig


def valid_parallel_sizes(config: ErnieMoeConfig) -> tuple[list[int], list[int]]:
    """(tensor-parallel sizes, expert-parallel sizes) this config can be split into."""
    tp = [
        t
        for t in range(1, config.num_key_value_heads + 1)
        if config.num_key_value_heads % t == 0 and config.num_attention_heads % t == 0
    ]
    ep = [e for e in range(1, config.moe_num_experts + 1) if config.moe_num_experts % e == 0]
    return tp, ep


@dataclass(frozen=True)
class ShardSpec:
    """The slice of the model owned by `rank` in a world of `world_size` ranks (T = E = W)."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")

    def check(self, config: ErnieMoeConfig) -> None:
        tp_sizes, ep_sizes = valid_parallel_sizes(config)
        if self.world_size not in tp_sizes:
            raise ValueError(
                f"tensor_parallel_size {self.world_size} must divide num_key_value_heads "
                f"({config.num_key_value_heads}) and num_attention_heads "
                f"({config.num_attention_heads}); valid sizes: {tp_sizes}"
            )
        if config.moe_layer_ids and self.world_size not in ep_sizes:
            raise ValueError(
                f"expert_parallel_size {self.world_size} must divide moe_num_experts "
                f"({config.moe_num_experts}); valid sizes: {ep_sizes}"
            )

    def _split(self, total: int) -> tuple[int, int]:
        per_rank = total // self.world_size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def q_heads(self, config: ErnieMoeConfig) -> tuple[int, int]:
        return self._split(config.num_attention_heads)

    def kv_heads(self, config: ErnieMoeConfig) -> tuple[int, int]:
        return self._split(config.num_key_value_heads)

    def experts(self, config: ErnieMoeConfig) -> tuple[int, int]:
        return self._split(config.moe_num_experts)

    def vocab(self, config: ErnieMoeConfig) -> tuple[int, int]:
        """Vocabulary rows [start, stop); the last rank takes the remainder."""
        per_rank = -(-config.vocab_size // self.world_size)
        start = min(self.rank * per_rank, config.vocab_size)
        return start, min(start + per_rank, config.vocab_size)
