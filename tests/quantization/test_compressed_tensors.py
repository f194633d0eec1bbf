"""Pre-quantized compressed-tensors checkpoints written by llm-compressor (tests/quantization/
fixtures, made by make_llmcompressor_checkpoints.py): the weights we load dequantize, bit for
bit, to what llm-compressor's own decompress returns (SHA-256 digests stored beside each
checkpoint), the engine runs them, and formats we do not read are refused by name."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie_cluster import LLM, SamplingParams
from ernie_cluster.loader.compressed_tensors import read_checkpoint_quantization
from ernie_cluster.loader.model_loader import load_model
from ernie_cluster.quantization.weight import QuantizedWeight

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SCHEMES = {"W8A16": "wint8", "W4A16": "wint4", "FP8_DYNAMIC": "fp8", "FP8_BLOCK": "block_wise_fp8"}


def checkpoint_weights(model) -> dict[str, torch.Tensor]:
    """Our dequantized weights (bfloat16) under the checkpoint's Linear names."""
    out = {}
    for index, layer in enumerate(model.layers):
        prefix = f"model.layers.{index}"
        attn = layer.self_attn
        qkv = attn.qkv_proj.dequantize(torch.bfloat16)
        q, kv = attn.q_size, attn.kv_size
        out[f"{prefix}.self_attn.q_proj.weight"] = qkv[:q]
        out[f"{prefix}.self_attn.k_proj.weight"] = qkv[q : q + kv]
        out[f"{prefix}.self_attn.v_proj.weight"] = qkv[q + kv :]
        out[f"{prefix}.self_attn.o_proj.weight"] = attn.o_proj.dequantize(torch.bfloat16)
        mlps = {f"{prefix}.mlp": layer.mlp}
        if hasattr(layer.mlp, "experts"):
            mlps = {f"{prefix}.mlp.shared_experts": layer.mlp.shared_experts}
            experts = layer.mlp.experts
            gate_up = experts.gate_up_proj.dequantize(torch.bfloat16)
            down = experts.down_proj.dequantize(torch.bfloat16)
            inter = experts.intermediate_size
            for e in range(gate_up.shape[0]):
                name = f"{prefix}.mlp.experts.{e}"
                out[f"{name}.gate_proj.weight"] = gate_up[e, :inter]
                out[f"{name}.up_proj.weight"] = gate_up[e, inter:]
                out[f"{name}.down_proj.weight"] = down[e]
        for name, mlp in mlps.items():
            gate_up = mlp.gate_up_proj.dequantize(torch.bfloat16)
            out[f"{name}.gate_proj.weight"] = gate_up[: mlp.intermediate_size]
            out[f"{name}.up_proj.weight"] = gate_up[mlp.intermediate_size :]
            out[f"{name}.down_proj.weight"] = mlp.down_proj.dequantize(torch.bfloat16)
    return out


def digest(weight: torch.Tensor) -> str:
    return hashlib.sha256(weight.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_loaded_weights_equal_llm_compressors_dequantized_weights_bit_for_bit(scheme):
    path = FIXTURES / f"llmc_{scheme}"
    expected = json.loads((path / "dequantized_sha256.json").read_text())
    model = load_model(path, dtype=torch.bfloat16, show_progress=False)
    ours = checkpoint_weights(model)
    assert set(ours) == set(expected)
    mismatched = [name for name, weight in ours.items() if digest(weight) != expected[name]]
    assert not mismatched
    quantized = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    assert {m.scheme.name for m in quantized} == {SCHEMES[scheme]}
    # The router, untouched by llm-compressor (ignored), stays float32.
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32


def test_a_changed_scale_breaks_the_bit_for_bit_match(tmp_path):
    """The digest comparison is sharp: one scale off by a bfloat16 step or two fails it."""
    source = FIXTURES / "llmc_W4A16"
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    tensors[name][0, 0] *= 1 + 2**-7  # up by one or two bfloat16 steps
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    ours = checkpoint_weights(load_model(path, dtype=torch.bfloat16, show_progress=False))
    expected = json.loads((path / "dequantized_sha256.json").read_text())
    changed = [n for n, w in ours.items() if digest(w) != expected[n]]
    assert changed == ["model.layers.0.self_attn.q_proj.weight"]


def dense_twin(source: Path, directory: Path) -> Path:
    """The checkpoint with every quantized Linear replaced by our dequantized bfloat16 weight
    and no quantization_config: what the unquantized engine should compute the same on."""
    model = load_model(source, dtype=torch.bfloat16, show_progress=False)
    dense = {k: v for k, v in load_file(source / "model.safetensors").items()}
    for name, weight in checkpoint_weights(model).items():
        prefix = name.removesuffix(".weight")
        for key in [k for k in dense if k.startswith(prefix + ".")]:
            del dense[key]
        dense[name] = weight.contiguous()
    directory.mkdir()
    save_file(dense, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    del config["quantization_config"]
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copy(source / "generation_config.json", directory)
    return directory


@pytest.mark.parametrize("scheme", ["W4A16", "FP8_BLOCK"])
def test_engine_on_a_prequantized_checkpoint_equals_the_engine_on_its_dequantized_twin(
    scheme, tmp_path
):
    source = FIXTURES / f"llmc_{scheme}"
    twin = dense_twin(source, tmp_path / "twin")
    prompts = [[5, 6, 7, 8, 9], [40] * 20]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    results = []
    for path in (source, twin):
        with LLM(model=str(path), dtype="bfloat16", show_progress=False, num_kv_blocks=16) as llm:
            results.append([o.outputs[0] for o in llm.generate(prompts, params)])
    for got, want in zip(*results, strict=True):
        assert got.token_ids == want.token_ids
        for got_step, want_step in zip(got.logprobs, want.logprobs, strict=True):
            for token, value in want_step.items():
                assert abs(got_step[token] - value) < 0.05  # bfloat16 kernels differ


def test_asking_for_another_method_than_the_checkpoints_is_a_clear_error():
    with pytest.raises(ValueError, match=r"already quantized .*drop --quantization wint8"):
        load_model(FIXTURES / "llmc_W4A16", quantization="wint8", show_progress=False)


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"quant_method": "gptq", "bits": 4},
            "'gptq' is not supported; we read compressed-tensors",
        ),
        ({"quant_method": "awq"}, "'awq' is not supported"),
        ({"quant_method": "gguf"}, "'gguf' is not supported"),
    ],
)
def test_other_checkpoint_formats_are_refused_naming_what_we_read(config, message):
    with pytest.raises(ValueError, match=message):
        read_checkpoint_quantization({"quantization_config": config})


def test_unsupported_compressed_tensors_options_are_refused():
    raw = json.loads((FIXTURES / "llmc_W4A16" / "config.json").read_text())
    weights = raw["quantization_config"]["config_groups"]["group_0"]["weights"]
    weights["symmetric"] = False
    with pytest.raises(ValueError, match="asymmetric weights"):
        read_checkpoint_quantization(raw)
    weights["symmetric"], weights["num_bits"] = True, 2
    with pytest.raises(ValueError, match="int2 weights"):
        read_checkpoint_quantization(raw)
