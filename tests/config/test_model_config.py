"""config.json parsing: defaults, both rope_theta layouts, -1 end index, validation."""

from __future__ import annotations

import json

import pytest

from ernie_cluster.config import ErnieMoeConfig

REAL = {
    "model_type": "ernie4_5_moe",
    "hidden_size": 2560,
    "intermediate_size": 12288,
    "num_hidden_layers": 28,
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "vocab_size": 103424,
    "moe_num_experts": 64,
    "moe_k": 6,
    "moe_num_shared_experts": 2,
    "moe_layer_start_index": 1,
    "moe_layer_end_index": 27,
    "moe_layer_interval": 1,
    "moe_intermediate_size": 1536,
    "rope_theta": 500000,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "use_bias": False,
    "moe_capacity": [64, 64, 64],
    "moe_gate": "top2_fused",
    "moe_use_aux_free": True,
}


def test_real_config():
    cfg = ErnieMoeConfig.from_dict(REAL)
    assert cfg.head_dim == 128
    assert cfg.moe_layer_ids == list(range(1, 28))
    assert cfg.rope_theta == 500000
    assert cfg.kv_bytes_per_token(2) == 57344
    assert cfg.extra["moe_gate"] == "top2_fused"


def test_rope_parameters_and_end_index_minus_one():
    raw = {
        **REAL,
        "moe_layer_end_index": -1,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    }
    del raw["rope_theta"]
    cfg = ErnieMoeConfig.from_dict(raw)
    assert cfg.rope_theta == 10000.0
    assert cfg.moe_layer_end_index == 27


def test_head_dim_honoured():
    cfg = ErnieMoeConfig.from_dict(
        {**REAL, "hidden_size": 1024, "num_attention_heads": 16, "head_dim": 128}
    )
    assert cfg.head_dim == 128 and cfg.q_size == 2048


def test_interval_two():
    cfg = ErnieMoeConfig.from_dict(
        {
            **REAL,
            "moe_layer_interval": 2,
            "num_hidden_layers": 6,
            "moe_layer_end_index": -1,
            "moe_layer_start_index": 0,
        }
    )
    assert cfg.moe_layer_ids == [1, 3, 5]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_key_value_heads": 3}, r"num_attention_heads \(20\).*num_key_value_heads \(3\)"),
        ({"moe_k": 65}, r"moe_k \(65\).*moe_num_experts \(64\)"),
        ({"moe_layer_end_index": 28}, r"moe_layer_end_index \(28\).*num_hidden_layers \(28\)"),
        ({"hidden_size": -1}, r"hidden_size \(-1\) must be a positive multiple"),
        ({"hidden_size": 0, "head_dim": 128}, r"hidden_size must be a positive integer, got 0"),
        ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
        ({"model_type": "llama"}, r"model_type 'llama'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, r"rope_type 'yarn'"),
    ],
)
def test_impossible_values(change, message):
    with pytest.raises(ValueError, match=message):
        ErnieMoeConfig.from_dict({**REAL, **change})


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ErnieMoeConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        ErnieMoeConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(REAL))
    assert ErnieMoeConfig.from_pretrained(tmp_path).num_hidden_layers == 28
