"""The demo model's architecture: a small `ernie4_5_moe` config with real expert parallelism.

Three MoE layers of 8 experts (top-2) plus a shared expert after one dense layer, and 4 KV
heads, so the checkpoint serves at tensor/expert parallel sizes 1, 2 and 4. The vocabulary
size is the tokenizer's, known only once it is built.
"""

from __future__ import annotations

from typing import Any

from ernie_cluster_tools.fixtures.presets import preset_config

DEMO_ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "moe_num_experts": 8,
    "moe_k": 2,
    "moe_num_shared_experts": 1,
    "moe_layer_start_index": 1,
    "max_position_embeddings": 4096,
}


def demo_config(vocab_size: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json contents of the demo checkpoint (the `tiny` preset's common keys)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    config = preset_config("tiny")
    config.update(DEMO_ARCHITECTURE)
    config.update(overrides or {})
    config["vocab_size"] = vocab_size
    return config


def hf_config(config: dict[str, Any]):
    """transformers' Ernie4_5_MoeConfig for the same architecture, set up for training."""
    from transformers import Ernie4_5_MoeConfig

    keys = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
    hf = Ernie4_5_MoeConfig(**keys)
    # NOTE: measured on a 2-core CPU at this size: SDPA attention trains twice as fast as
    # eager; the looped experts beat grouped_mm and batched_mm and need no optional kernels.
    hf._attn_implementation = "sdpa"
    hf._experts_implementation = "eager"
    return hf
