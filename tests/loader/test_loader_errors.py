"""The loader fails loudly and precisely on inconsistent checkpoints, and loads subsets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_reference import save_hf_checkpoint
from safetensors.torch import load_file, save_file

from ernie_cluster.loader.checkpoint_files import CheckpointError
from ernie_cluster.loader.model_loader import load_model
from ernie_cluster.model.sharding import ShardSpec


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return save_hf_checkpoint(tmp_path_factory.mktemp("pristine"), seed=3)


@pytest.fixture
def checkpoint(pristine, tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(pristine, target)
    return target


def _index(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def _rewrite(path: Path, name: str, change) -> None:
    """Apply `change(tensors)` to the shard that holds `name` and fix up the index."""
    index = _index(path)
    shard = path / index["weight_map"][name]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {
        **{k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name},
        **dict.fromkeys(tensors, shard.name),
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_loads_clean(checkpoint):
    model = load_model(checkpoint, dtype="float32", show_progress=False)
    assert model.config.num_hidden_layers == 3


def test_missing_tensor(checkpoint):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite(checkpoint, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.3"):
        load_model(checkpoint, dtype="float32", show_progress=False)


def test_unexpected_tensor(checkpoint):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite(checkpoint, name, lambda t: t.update({"model.layers.1.mystery.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.1\.mystery"):
        load_model(checkpoint, dtype="float32", show_progress=False)


def test_mtp_tensors_are_skipped(pristine, checkpoint):
    # Multi-token-prediction heads, at the top level and nested as ERNIE-4.5 names them
    # (`model.mtp_*`): present in the checkpoint, absent from the model, and no other weight
    # changes because of them.
    mtp = {
        "mtp_block.0.weight": torch.ones(3),
        "model.mtp_block.0.mlp.up_proj.weight": torch.full((4, 8), 7.0),
        "model.mtp_emb_norm.0.weight": torch.full((8,), 7.0),
        "model.mtp_linear_proj.0.weight": torch.full((8, 16), 7.0),
    }
    _rewrite(checkpoint, "model.norm.weight", lambda t: t.update(mtp))
    assert set(mtp) <= set(_index(checkpoint)["weight_map"])
    loaded = load_model(checkpoint, dtype="float32", show_progress=False).state_dict()
    clean = load_model(pristine, dtype="float32", show_progress=False).state_dict()
    assert not [name for name in loaded if "mtp" in name]
    assert loaded.keys() == clean.keys()
    changed = [name for name, tensor in clean.items() if not torch.equal(loaded[name], tensor)]
    assert changed == []


def test_wrong_shape_names_both_shapes(checkpoint):
    name = "model.layers.2.self_attn.k_proj.weight"
    _rewrite(checkpoint, name, lambda t: t.update({name: torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*\[16, 64\].*expected \[32, 64\]"):
        load_model(checkpoint, dtype="float32", show_progress=False)


def test_index_pointing_to_missing_file(checkpoint):
    index = _index(checkpoint)
    name = "model.embed_tokens.weight"
    index["weight_map"][name] = "model-99999-of-99999.safetensors"
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"broken index.*embed_tokens.*does not exist"):
        load_model(checkpoint, dtype="float32", show_progress=False)


def test_index_pointing_to_wrong_file(checkpoint):
    index = _index(checkpoint)
    files = sorted(set(index["weight_map"].values()))
    name = "model.embed_tokens.weight"
    index["weight_map"][name] = next(f for f in files if f != index["weight_map"][name])
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"broken index.*embed_tokens.*does not contain"):
        load_model(checkpoint, dtype="float32", show_progress=False)


def test_index_not_json(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"broken index.*not valid JSON"):
        load_model(checkpoint, dtype="float32", show_progress=False)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(tmp_path, show_progress=False)


def test_rank_loads_only_its_slice(checkpoint):
    """At W = 2 each rank holds half the experts and half the heads, with the right values."""
    full = load_model(checkpoint, dtype="float32", show_progress=False)
    ranks = [
        load_model(checkpoint, dtype="float32", shard=ShardSpec(r, 2), show_progress=False)
        for r in range(2)
    ]
    full_experts = full.layers[1].mlp.experts
    for r, model in enumerate(ranks):
        experts = model.layers[1].mlp.experts
        assert experts.gate_up_proj.shape[0] == full_experts.gate_up_proj.shape[0] // 2
        half = experts.gate_up_proj.shape[0]
        assert torch.equal(
            experts.gate_up_proj, full_experts.gate_up_proj[r * half : (r + 1) * half]
        )
        attn, full_attn = model.layers[0].self_attn, full.layers[0].self_attn
        assert attn.num_heads == 2 and attn.num_kv_heads == 1
        q_rows = full_attn.qkv_proj[r * attn.q_size : (r + 1) * attn.q_size]
        assert torch.equal(attn.qkv_proj[: attn.q_size], q_rows)
