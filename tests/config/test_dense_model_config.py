"""Dense `ernie4_5` config.json (ERNIE-4.5-0.3B): no MoE layer, transformers' defaults for what
it leaves out, moe_* keys ignored as transformers ignores them; unknown model types refused."""

from __future__ import annotations

import json

import pytest

from ernie_cluster.config import ErnieMoeConfig
from ernie_cluster.loader.model_loader import load_model

# config.json of baidu/ERNIE-4.5-0.3B-PT as transformers writes it.
REAL_DENSE = {
    "architectures": ["Ernie4_5ForCausalLM"],
    "model_type": "ernie4_5",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "max_position_embeddings": 131072,
    "num_attention_heads": 16,
    "num_hidden_layers": 18,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "dtype": "bfloat16",
    "use_bias": False,
    "use_cache": False,
    "vocab_size": 103424,
}


def test_real_dense_config_has_no_moe_layer():
    cfg = ErnieMoeConfig.from_dict(REAL_DENSE)
    assert cfg.moe_layer_ids == []
    assert (cfg.moe_num_experts, cfg.moe_k, cfg.moe_num_shared_experts) == (0, 0, 0)
    assert cfg.head_dim == 128 and cfg.q_size == 2048 and cfg.kv_size == 256
    assert cfg.tie_word_embeddings and cfg.rope_theta == 500000.0
    assert cfg.kv_bytes_per_token(2) == 2 * 18 * 256 * 2
    assert cfg.torch_dtype == "bfloat16"


def test_left_out_keys_take_transformers_dense_defaults():
    from transformers import Ernie4_5Config

    reference = Ernie4_5Config()
    cfg = ErnieMoeConfig.from_dict({"model_type": "ernie4_5"})
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert getattr(cfg, name) == getattr(reference, name), name
    assert cfg.rope_theta == reference.rope_parameters["rope_theta"]
    # head_dim null: transformers derives hidden // heads, as we do.
    derived = ErnieMoeConfig.from_dict({**REAL_DENSE, "head_dim": None})
    assert derived.head_dim == Ernie4_5Config(head_dim=None).head_dim == 64


def test_moe_keys_in_a_dense_config_are_ignored():
    moe_keys = {"moe_num_experts": 64, "moe_k": 6, "moe_layer_start_index": 1}
    cfg = ErnieMoeConfig.from_dict({**REAL_DENSE, **moe_keys})
    assert cfg.moe_layer_ids == [] and cfg.moe_num_experts == 0
    assert cfg.extra["moe_num_experts"] == 64


@pytest.mark.parametrize("model_type", ["llama", "ernie4_5_moe_vl", "qwen3_moe"])
def test_unknown_model_type_fails_naming_it(model_type, tmp_path):
    expected = rf"model_type '{model_type}' is not supported; expected one of .*'ernie4_5'"
    with pytest.raises(ValueError, match=expected):
        ErnieMoeConfig.from_dict({**REAL_DENSE, "model_type": model_type})
    (tmp_path / "config.json").write_text(json.dumps({**REAL_DENSE, "model_type": model_type}))
    with pytest.raises(ValueError, match=expected):
        load_model(tmp_path, show_progress=False)


def test_a_moe_config_still_needs_its_expert_width():
    with pytest.raises(ValueError, match=r"moe_intermediate_size must be a positive integer"):
        ErnieMoeConfig.from_dict({"model_type": "ernie4_5_moe", "moe_intermediate_size": 0})
