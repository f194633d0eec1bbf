"""Generated checkpoints: hub layout, determinism, and that transformers loads them too."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from ernie_cluster.config import ErnieMoeConfig
from ernie_cluster_tools.fixtures.make_tiny import make_tiny_checkpoint


def digest(directory) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def test_hub_layout(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    for required in (
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ):
        assert required in names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 2
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    cfg = ErnieMoeConfig.from_pretrained(tiny_checkpoint)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.moe_num_experts, cfg.moe_k) == (64, 4, 8, 2)
    assert cfg.moe_layer_ids == [1, 2, 3]


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tiny_checkpoint):
    again = make_tiny_checkpoint(tmp_path / "again", preset="tiny", seed=0)
    assert digest(again) == digest(tiny_checkpoint)
    other = make_tiny_checkpoint(tmp_path / "other", preset="tiny", seed=1)
    changed = {k for k, v in digest(other).items() if digest(tiny_checkpoint)[k] != v}
    assert any(name.endswith(".safetensors") for name in changed)


def test_correction_biases_nonzero_and_router_fp32(tiny_checkpoint):
    from safetensors import safe_open

    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.moe_statics.e_score_correction_bias"
    with safe_open(tiny_checkpoint / index["weight_map"][name], "pt") as f:
        bias = f.get_tensor(name)
    assert bias.dtype == torch.float32 and bias.abs().min() > 0


def test_transformers_loads_it_and_agrees(tiny_checkpoint):
    """The generated checkpoint is a valid HF checkpoint: same logits in transformers."""
    from transformers import Ernie4_5_MoeForCausalLM

    from ernie_cluster import LLM, SamplingParams

    hf = Ernie4_5_MoeForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    prompt = [5, 17, 99, 300, 42, 7]
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    with LLM(model=str(tiny_checkpoint), dtype="float32", show_progress=False) as llm:
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=5))
    entry = out[0].outputs[0].logprobs[0]
    assert out[0].outputs[0].token_ids[0] == int(expected.argmax())
    for token, value in entry.items():
        assert value == pytest.approx(expected[token].item(), abs=1e-4)


def test_non_empty_directory_needs_force(tmp_path):
    target = make_tiny_checkpoint(tmp_path / "ck", preset="tiny", seed=0, num_shards=3)
    before = digest(target)
    with pytest.raises(ValueError, match=r"is not empty \(\d+ entries: .*--force"):
        make_tiny_checkpoint(target, preset="tiny", seed=1)
    assert digest(target) == before
    make_tiny_checkpoint(target, preset="tiny", seed=1, num_shards=2, force=True)
    shards = sorted(p.name for p in target.glob("*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    with pytest.raises(ValueError, match="is a file"):
        make_tiny_checkpoint(target / "config.json")
