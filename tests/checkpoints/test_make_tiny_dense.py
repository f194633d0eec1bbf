"""The dense presets: `tiny-dense` writes an `ernie4_5` checkpoint with the tiny preset's
tokenizer files (so it drafts for it), and `full-dense` is the ERNIE-4.5-0.3B shape."""

from __future__ import annotations

import json

from test_make_tiny import digest

from ernie_cluster.config import ErnieMoeConfig
from ernie_cluster_tools.fixtures.make_tiny import make_tiny_checkpoint
from ernie_cluster_tools.fixtures.presets import preset_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def test_tiny_dense_is_an_ernie4_5_checkpoint_with_the_tiny_tokenizer(tmp_path, tiny_checkpoint):
    dense = make_tiny_checkpoint(tmp_path / "dense", preset="tiny-dense", seed=0)
    raw = json.loads((dense / "config.json").read_text())
    assert (raw["model_type"], raw["architectures"]) == ("ernie4_5", ["Ernie4_5ForCausalLM"])
    assert not any(key.startswith("moe_") for key in raw)
    index = json.loads((dense / "model.safetensors.index.json").read_text())
    assert not any(".experts." in name or "mlp.gate." in name for name in index["weight_map"])
    assert len(set(index["weight_map"].values())) >= 2
    ours, theirs = digest(dense), digest(tiny_checkpoint)
    for name in (*TOKENIZER_FILES, "chat_template.jinja", "generation_config.json"):
        assert ours[name] == theirs[name], name
    again = make_tiny_checkpoint(tmp_path / "again", preset="tiny-dense", seed=0)
    assert digest(again) == ours


def test_full_dense_is_the_0_3b_shape():
    from transformers import Ernie4_5Config

    cfg = ErnieMoeConfig.from_dict(preset_config("full-dense"))
    reference = Ernie4_5Config()  # transformers' defaults are ERNIE-4.5-0.3B's
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "head_dim", "vocab_size")
    for name in (*shape, "num_attention_heads", "num_key_value_heads"):
        assert getattr(cfg, name) == getattr(reference, name), name
    assert cfg.moe_layer_ids == []
    assert cfg.vocab_size == ErnieMoeConfig.from_dict(preset_config("full")).vocab_size
