"""The shipped demo checkpoint: architecture, size, dtypes, tokenizer and training log."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer

from ernie_cluster.checkpoints.demo import demo_checkpoint as shipped_checkpoint
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.tokenizer import load_tokenizer
from ernie_cluster_tools.demo_model import lexicon
from ernie_cluster_tools.fixtures.tiny_tokenizer import CONTROL_TOKENS

MAX_BYTES = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def checkpoint():
    return shipped_checkpoint()


def test_architecture_has_real_expert_and_tensor_parallelism(checkpoint):
    raw = json.loads((checkpoint / "config.json").read_text())
    config = ErnieMoeConfig.from_dict(raw)
    assert raw["model_type"] == "ernie4_5_moe"
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    assert len(moe_layers) >= 2
    assert config.moe_num_experts >= 8 and config.moe_k > 1 and config.moe_num_shared_experts >= 1
    assert config.num_key_value_heads == 4
    for world in (2, 4):
        assert config.num_attention_heads % world == 0 and config.moe_num_experts % world == 0


def test_weights_are_small_bfloat16_with_float32_routers(checkpoint):
    files = list(checkpoint.glob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) < MAX_BYTES
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    dtypes = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                dtypes[name] = f.get_slice(name).get_dtype()
    assert set(dtypes) == set(index["weight_map"])
    assert "lm_head.weight" not in dtypes  # tied embeddings
    for name, dtype in dtypes.items():
        router = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        assert dtype == ("F32" if router else "BF16"), name
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in dtypes
    assert "model.layers.1.mlp.moe_statics.e_score_correction_bias" in dtypes


def test_tokenizer_loads_with_single_id_control_tokens(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    assert tokenizer is not None and tokenizer.chat_template
    for expected_id, (content, _) in enumerate(CONTROL_TOKENS):
        assert tokenizer.encode(content) == [expected_id]
    text = 'Hi!\n<think>\nIt is -3 degrees in "Nairobi".\n</think>\n你好 🙂'
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_a_city_is_the_same_pieces_in_every_context(checkpoint):
    backend = HFTokenizer.from_file(str(checkpoint / "tokenizer.json"))
    for city in lexicon.HELDOUT_CITIES:
        pieces = backend.encode(city).ids
        for context in (f"weather in {city}?", f'{{"location": "{city}"}}', f'\\"{city}\\",'):
            ids = backend.encode(context).ids
            assert any(ids[i : i + len(pieces)] == pieces for i in range(len(ids))), (
                city,
                context,
            )


def test_training_log_records_the_run(checkpoint):
    log = json.loads((checkpoint / "train_log.json").read_text())
    assert len(log["losses"]) == log["settings"]["num_steps"]
    assert log["final_loss"] < 0.5 * log["losses"][0]
