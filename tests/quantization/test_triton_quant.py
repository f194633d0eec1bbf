"""The Triton kernels that multiply by quantized weights (quantization/triton_gemm and the
quantized variants of model/triton_moe) against a dequantize-then-matmul torch reference, for
every storage format, scale groups larger than, equal to and smaller than a K step, float32 and
bfloat16 activations: the W8A16 / W4A16 variants (fp8 weights are pinned to W8A16 here, on a
sm_89+ GPU too; test_triton_w8a8 covers W8A8).

Without a GPU the kernels run in Triton's CPU interpreter on CPU tensors (the weights built
without the CPU prepack, which would drop fp8's canonical layout); with one, on CUDA tensors.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

pytest.importorskip("triton")

from quant_weights import DEVICE, make_weight, randn

from ernie_cluster.model import fused_moe
from ernie_cluster.quantization import fp8_activations, triton_gemm
from ernie_cluster.quantization.schemes import (
    FP8_MAX,
    quantize,
    quantize_with_scales,
    scheme_for,
)
from ernie_cluster.quantization.weight import QuantizedWeight

# The device's own variant, but model-dtype activations where it would run W8A8.
W8A16 = fp8_activations.fp8_variant(torch.device(DEVICE)).replace("w8a8", "w8a16")
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])

# (method, group_size, K): per-row scales with K off the K step (masked tail), groups that are
# whole K steps, a group equal to K (stored as one scale per row), and groups of 8 columns,
# smaller than tl.dot's 16 (scaled element by element).
CASES = [
    ("wint8", None, 160),
    ("wint4", 64, 192),
    ("wint4", 128, 256),
    ("wint4", 96, 96),
    ("wint4", 8, 64),
    ("fp8", None, 160),
    ("block_wise_fp8", 128, 256),
    ("block_wise_fp8", 64, 192),
]
CASE_IDS = [f"{method}-g{group}-k{cols}" for method, group, cols in CASES]


@pytest.fixture(autouse=True)
def _w8a16(monkeypatch):
    monkeypatch.setattr(fp8_activations, "fp8_variant", lambda device: W8A16)


def reference(x, weight, expert=None):
    """x [M, K] @ W^T in float32, W dequantized in float32 (quantization/schemes)."""
    dense = weight.dequantize(torch.float32)
    dense = dense if expert is None else dense[expert]
    return x.float() @ dense.T


def assert_close(got, expected, dtype):
    """fp32: float32 rounding apart (per-row scales multiply the sum, the reference's each
    product). bf16: the result rounded to bfloat16, and with scale groups W rounded too."""
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@DTYPES
@pytest.mark.parametrize("num_rows", [1, 5, 33, 70])
@pytest.mark.parametrize(("method", "group", "cols"), CASES, ids=CASE_IDS)
def test_matmul_matches_dequantized_reference(method, group, cols, num_rows, dtype):
    weight = make_weight(method, group, (96, cols), dtype)
    x = randn(num_rows, cols, seed=1).to(DEVICE, dtype)
    got = triton_gemm.quantized_matmul(x, weight, None)
    assert got.shape == (num_rows, 96)
    assert_close(got, reference(x, weight), dtype)


@DTYPES
@pytest.mark.parametrize(("method", "group", "cols"), CASES, ids=CASE_IDS)
def test_matmul_by_one_expert_of_a_stacked_weight(method, group, cols, dtype):
    weight = make_weight(method, group, (4, 64, cols), dtype)
    x = randn(5, cols, seed=2).to(DEVICE, dtype)
    for expert in (0, 3):
        got = triton_gemm.quantized_matmul(x, weight, expert)
        assert_close(got, reference(x, weight, expert), dtype)
    # The experts differ, so a wrong expert offset could not pass.
    assert not torch.allclose(reference(x, weight, 0), reference(x, weight, 3), atol=1e-2)


@pytest.mark.parametrize(
    ("method", "native_fp8"),
    [("wint8", True), ("wint4", True), ("fp8", True), ("fp8", False)],
    ids=["wint8", "wint4", "fp8e4nv", "fp8bits"],
)
def test_every_stored_value_decodes_exactly(method, native_fp8, monkeypatch):
    """x = I picks W^T out of the kernel: every int8, int4 and finite e4m3 code (subnormals,
    both zeros, +-448) times scale 1 must come back exact, loaded as Triton's e4m3 type or
    decoded from its bits (sm < 89)."""
    variant = W8A16 if native_fp8 else "w8a16-bytes"
    monkeypatch.setattr(fp8_activations, "fp8_variant", lambda device: variant)
    cols, rows = 64, 32
    if method == "fp8":
        codes = torch.arange(256, dtype=torch.int32)
        codes = codes[(codes & 0x7F) != 0x7F]  # all but the two NaNs
        codes = codes.repeat(-(-rows * cols // codes.numel()))[: rows * cols]
        values = codes.to(torch.uint8).view(torch.float8_e4m3fn).float().reshape(rows, cols)
        assert values.abs().max() == FP8_MAX
    elif method == "wint8":
        values = torch.arange(rows * cols).remainder(255).sub(127).float().reshape(rows, cols)
    else:
        values = torch.arange(rows * cols).remainder(16).sub(8).float().reshape(rows, cols)
    scheme = scheme_for(method)
    scale = torch.ones(rows, 1)
    if method == "wint4":
        scheme = scheme_for(method, cols)
    qweight = quantize_with_scales(values, scale, scheme)
    weight = QuantizedWeight(
        qweight.to(DEVICE),
        scale.to(DEVICE),
        scheme,
        (rows, cols),
        torch.float32,
        prepack_for_cpu=False,
    )
    got = triton_gemm.quantized_matmul(torch.eye(cols, device=DEVICE), weight, None)
    assert torch.equal(got.cpu(), values.T)


def test_rejects_what_it_cannot_multiply():
    weight = make_weight("wint8", None, (4, 64, 64), torch.float32)
    x = torch.zeros(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="expert=None"):
        triton_gemm.quantized_matmul(x, weight, None)
    with pytest.raises(ValueError, match="does not multiply"):
        triton_gemm.quantized_matmul(torch.zeros(3, 32, device=DEVICE), weight, 1)
    assert triton_gemm.quantized_matmul(x[:0], weight, 1).shape == (0, 64)
    if DEVICE == "cpu":  # the CPU prepack keeps fp8 only dequantized
        qweight, scale = quantize(randn(64, 64), scheme_for("fp8"))
        packed = QuantizedWeight(qweight, scale, scheme_for("fp8"), (64, 64), torch.float32)
        with pytest.raises(ValueError, match="prepack_for_cpu=False"):
            triton_gemm.quantized_matmul(x, packed, None)


def test_block_k_fits_scale_groups():
    assert triton_gemm.fit_block_k(128, 0) == 128  # one scale per row
    assert triton_gemm.fit_block_k(64, 128) == 64  # a step inside a group
    assert triton_gemm.fit_block_k(128, 64) == 64
    assert triton_gemm.fit_block_k(128, 96) == 32  # 96 = 3 * 32
    assert triton_gemm.fit_block_k(128, 8) == 128  # below 16: scaled element by element
    for _, config in triton_gemm.CONFIGS:
        for wide in (False, True):
            cfg = triton_gemm.for_operands(config, wide)
            for size in (cfg.block_m, cfg.block_n, cfg.block_k):
                assert size >= 16 and size & (size - 1) == 0
    assert triton_gemm.pick_config(1).block_m == 16
    assert triton_gemm.pick_config(4096).block_m == 128


# ---- fused MoE with quantized experts --------------------------------------------------------

# gate_up's K = 256 holds two groups of 128; down's K = 96 cuts groups of 64 to 32 (the scales
# of the two halves of a group repeat).
HIDDEN, INTER, EXPERTS = 256, 96, 4
BF16, FP32 = torch.bfloat16, torch.float32
# (method, group, tokens, dtype): every format at decode size (block_m 16); the block_m 32 tile
# config; float32's narrow K steps (in the interpreter both dtypes dequantize alike, so two).
MOE_CASES = [
    ("wint8", None, 5, BF16),
    ("wint4", 64, 5, BF16),
    ("wint4", 128, 5, BF16),
    ("fp8", None, 5, BF16),
    ("block_wise_fp8", 128, 5, BF16),
    ("wint8", None, 33, BF16),
    ("wint4", 128, 33, BF16),
    ("wint4", 64, 5, FP32),
    ("fp8", None, 5, FP32),
]


@pytest.mark.parametrize(
    ("method", "group", "num_tokens", "dtype"),
    MOE_CASES,
    ids=[f"{m}-g{g}-m{t}-{str(d)[6:]}" for m, g, t, d in MOE_CASES],
)
def test_fused_experts_match_loop_over_dequantized_experts(method, group, num_tokens, dtype):
    """The Triton path with quantized gate_up [E, 2I, H] and down [E, H, I] against the per-expert
    loop on the same experts dequantized (to x's dtype, as the loop takes them). Expert start 2
    with ids outside [2, 6): pairs not owned here must be skipped."""
    gate_up = make_weight(method, group, (EXPERTS, 2 * INTER, HIDDEN), dtype, seed=3)
    down = make_weight(method, group, (EXPERTS, HIDDEN, INTER), dtype, seed=4)
    gen = torch.Generator().manual_seed(5)
    x = randn(num_tokens, HIDDEN, seed=6).to(DEVICE, dtype)
    ids = torch.rand(num_tokens, EXPERTS + 2, generator=gen).argsort(-1)[:, :2].to(DEVICE)
    weights = torch.rand(num_tokens, 2, generator=gen).to(DEVICE, dtype)
    got, counts = fused_moe.fused_experts(x, ids, weights, gate_up, down, 2, "triton")
    expected, expected_counts = fused_moe.fused_experts(
        x, ids, weights, gate_up.dequantize(dtype), down.dequantize(dtype), 2, "loop"
    )
    assert got.dtype == dtype and torch.equal(counts, expected_counts)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize(("method", "group"), [("fp8", None), ("block_wise_fp8", 64)])
def test_fp8_decoded_from_bytes_as_on_sm80(method, group, monkeypatch):
    """The e4m3 path of GPUs without Triton's fp8 type: bytes decoded in the kernel, the 2^8 it
    leaves out folded into the scales (per row, and per group in both MoE kernels)."""
    monkeypatch.setattr(fp8_activations, "fp8_variant", lambda device: "w8a16-bytes")
    dtype = torch.bfloat16
    weight = make_weight(method, group, (96, 192), dtype)
    x = randn(5, 192, seed=1).to(DEVICE, dtype)
    assert_close(triton_gemm.quantized_matmul(x, weight, None), reference(x, weight), dtype)
    gate_up = make_weight(method, group, (EXPERTS, 2 * INTER, HIDDEN), dtype, seed=3)
    down = make_weight(method, group, (EXPERTS, HIDDEN, INTER), dtype, seed=4)
    x = randn(5, HIDDEN, seed=6).to(DEVICE, dtype)
    ids = torch.tensor([[2, 3], [5, 4], [3, 2], [4, 5], [2, 5]], device=DEVICE)
    got, _ = fused_moe.fused_experts(x, ids, None, gate_up, down, 2, "triton")
    expected, _ = fused_moe.fused_experts(
        x, ids, None, gate_up.dequantize(dtype), down.dequantize(dtype), 2, "loop"
    )
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
