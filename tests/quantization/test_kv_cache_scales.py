"""Checkpoint KV-cache scales: a compressed-tensors checkpoint with a `kv_cache_scheme`, written
by llm-compressor (fixtures/llmc_FP8_KV: FP8_DYNAMIC weights, fp8 K/V scales calibrated per
layer). Its k_scale / v_scale reach the attention layers as llm-compressor wrote and held them,
an fp8 KV cache uses them, another cache ignores them (and says so), and schemes we cannot
honour are refused by name.

The decode oracle is transformers' Ernie4_5_MoeForCausalLM on the checkpoint's dequantized
weights (w * weight_scale, float32) with an attention function that rounds every key (after
RoPE) and value to e4m3 at the checkpoint's scale and back, which is what an fp8 cache with
those scales stores and reads.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from hf_reference import hf_logits
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ernie_cluster import LLM, SamplingParams
from ernie_cluster.attention.kv_quant import layer_kv_scales
from ernie_cluster.loader.compressed_tensors import read_checkpoint_quantization
from ernie_cluster.loader.model_loader import load_model

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "llmc_FP8_KV"
NUM_LAYERS = 2
E4M3_MAX = 448.0


def checkpoint_scales() -> list[tuple[float, float]]:
    with safe_open(FIXTURE / "model.safetensors", "pt") as handle:
        return [
            tuple(
                handle.get_tensor(f"model.layers.{i}.self_attn.{leaf}").float().item()
                for leaf in ("k_scale", "v_scale")
            )
            for i in range(NUM_LAYERS)
        ]


def test_loaded_scales_are_the_checkpoints(caplog):
    scales = checkpoint_scales()
    # llm-compressor's own modules held these values after calibration
    held = json.loads((FIXTURE / "kv_scales.json").read_text())
    for i, (k_scale, v_scale) in enumerate(scales):
        assert held[f"model.layers.{i}.self_attn.k_scale"] == [k_scale]
        assert held[f"model.layers.{i}.self_attn.v_scale"] == [v_scale]
    assert len(set(scales)) == NUM_LAYERS and all(k != v for k, v in scales)
    model = load_model(FIXTURE, dtype=torch.float32, show_progress=False, kv_cache_dtype="fp8")
    assert [layer_kv_scales(layer.self_attn) for layer in model.layers] == scales
    # A caller that does not say which cache it builds gets them too (a model-dtype cache
    # ignores its scales).
    model = load_model(FIXTURE, dtype=torch.float32, show_progress=False)
    assert [layer_kv_scales(layer.self_attn) for layer in model.layers] == scales
    with caplog.at_level(logging.INFO, logger="ernie_cluster.loader.model_loader"):
        model = load_model(FIXTURE, dtype=torch.float32, show_progress=False, kv_cache_dtype="auto")
    assert [layer_kv_scales(layer.self_attn) for layer in model.layers] == [(1.0, 1.0)] * 2
    assert "KV-cache scales (kv_cache_scheme) are ignored: the KV cache is 'auto'" in caplog.text


@pytest.mark.parametrize(
    "change, message",
    [
        ({"strategy": "channel"}, r"strategy 'channel'"),
        ({"strategy": "head"}, r"strategy 'head'"),
        ({"type": "int"}, r"int8 values"),
        ({"num_bits": 4}, r"float4 values"),
        ({"dynamic": True}, r"dynamic True scales"),
        ({"symmetric": False}, r"asymmetric scales"),
    ],
)
def test_kv_cache_schemes_we_cannot_honour_are_refused(change, message):
    raw = json.loads((FIXTURE / "config.json").read_text())
    assert read_checkpoint_quantization(raw).has_kv_scales
    raw["quantization_config"]["kv_cache_scheme"].update(change)
    with pytest.raises(ValueError, match=rf"unsupported kv_cache_scheme \({message}.*read \{{"):
        read_checkpoint_quantization(raw)


def test_missing_or_bad_scales_are_named(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.self_attn.v_scale"] = torch.tensor([0.0])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers.1.self_attn.v_scale must be one positive"):
        load_model(path, dtype=torch.float32, show_progress=False)
    del tensors["model.layers.1.self_attn.v_scale"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.v_scale' is missing"):
        load_model(path, dtype=torch.float32, show_progress=False)


def dequantized_twin(directory: Path):
    """transformers' model on the checkpoint's weights dequantized (float32), no scales."""
    from transformers import Ernie4_5_MoeForCausalLM

    tensors = load_file(FIXTURE / "model.safetensors")
    dense = {}
    for name, tensor in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf in ("weight_scale", "input_scale", "k_scale", "v_scale"):
            continue
        scale = tensors.get(f"{prefix}.weight_scale")
        dense[name] = tensor.float() if scale is None else tensor.float() * scale.float()
    directory.mkdir()
    save_file(dense, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((FIXTURE / "config.json").read_text())
    del config["quantization_config"]
    (directory / "config.json").write_text(json.dumps(config))
    return Ernie4_5_MoeForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def fake_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def oracle_logprobs(model, sequences, scales) -> list[torch.Tensor]:
    """[len, vocab] log-softmax per sequence, K and V rounded to e4m3 at `scales` per layer."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def fp8_kv_attention(module, query, key, value, attention_mask, **kwargs):
        k_scale, v_scale = scales[module.layer_idx]
        key, value = fake_fp8(key, k_scale), fake_fp8(value, v_scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("fp8_kv_oracle", fp8_kv_attention)
    model.set_attn_implementation("fp8_kv_oracle")
    try:
        return [torch.log_softmax(hf_logits(model, ids), -1) for ids in sequences]
    finally:
        model.set_attn_implementation("sdpa")


def test_greedy_decode_with_the_checkpoints_scales_matches_the_oracle(tmp_path):
    prompts = [[5, 6, 7, 8, 9], [40] * 20, list(range(3, 60, 2))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    engine = dict(dtype="float32", show_progress=False, num_kv_blocks=16)
    with LLM(model=str(FIXTURE), kv_cache_dtype="fp8", **engine) as llm:
        outputs = [out.outputs[0] for out in llm.generate(prompts, params)]
    twin = dequantized_twin(tmp_path / "twin")
    scales = checkpoint_scales()
    sequences = [p + o.token_ids for p, o in zip(prompts, outputs, strict=True)]
    expected = oracle_logprobs(twin, sequences, scales)
    unit = oracle_logprobs(twin, sequences, [(1.0, 1.0)] * NUM_LAYERS)
    gaps, unit_gaps = [], []
    for prompt, out, want, at_one in zip(prompts, outputs, expected, unit, strict=True):
        for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            row = want[len(prompt) - 1 + step]
            assert token == int(row.argmax()), (prompt, step)  # greedy under the oracle
            gaps.append(abs(entry[token] - row[token].item()))
            unit_gaps.append(abs(entry[token] - at_one[len(prompt) - 1 + step][token].item()))
    assert max(gaps) < 1e-4, max(gaps)
    # The scales matter: the same cache at scale 1 computes other logprobs.
    assert max(unit_gaps) > 1e-3, max(unit_gaps)
