"""The ERNIE-4.5 MoE model on flat token batches, its layers and weight mapping."""

from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ernie_cluster.model.sharding import ShardSpec

__all__ = ["Ernie4_5_MoeForCausalLM", "ShardSpec"]
