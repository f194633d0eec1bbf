"""Architectures of the generated checkpoints: `tiny` (tests), `mini` (CPU benchmarks) and
`full` (the real ERNIE-4.5-21B-A3B shape, for random-weight GPU benchmarks)."""

from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = {
    "architectures": ["Ernie4_5_MoeForCausalLM"],
    "model_type": "ernie4_5_moe",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "use_bias": False,
    "tie_word_embeddings": True,
    "moe_layer_start_index": 1,
    "moe_layer_end_index": -1,
    "moe_layer_interval": 1,
    "moe_norm_min": 1e-12,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        **_COMMON,
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "moe_num_experts": 8,
        "moe_k": 2,
        "moe_num_shared_experts": 2,
        "max_position_embeddings": 4096,
    },
    "mini": {
        **_COMMON,
        "vocab_size": 32000,
        "hidden_size": 640,
        "intermediate_size": 1536,
        "moe_intermediate_size": 192,
        "num_hidden_layers": 6,
        "num_attention_heads": 20,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "moe_num_experts": 64,
        "moe_k": 6,
        "moe_num_shared_experts": 2,
        "max_position_embeddings": 32768,
    },
    "full": {
        **_COMMON,
        "vocab_size": 103424,
        "hidden_size": 2560,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "num_hidden_layers": 28,
        "num_attention_heads": 20,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "moe_num_experts": 64,
        "moe_k": 6,
        "moe_num_shared_experts": 2,
        "max_position_embeddings": 131072,
    },
}


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[name])
