"""The W8A8 variant of the fp8 kernels (sm_89+): activation rows quantized to e4m3 with dynamic
per-row scales (quantization/triton_fp8_rows), e4m3 x e4m3 dots, the float32 result scaled by
the row's and the weight's scales, in the dense GEMM (quantization/triton_gemm) and both fused-MoE
kernels (model/triton_moe), against a torch reference written here: each row quantized to
torch.float8_e4m3fn with scale max(|row|) / 448, dequantized, and multiplied in float32 by the
dequantized weight. Per-channel and block scales, an all-zero row, and the choice by device.

Without a GPU the kernels run in Triton's CPU interpreter with the W8A8 variant forced; on a
GPU they run compiled where the device takes W8A8 (skipped below sm_89).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

pytest.importorskip("triton")

import torch.nn.functional as F
from quant_weights import DEVICE, make_weight, randn

from ernie_cluster.model import fused_moe
from ernie_cluster.quantization import fp8_activations, triton_gemm
from ernie_cluster.quantization.schemes import scheme_for
from ernie_cluster.quantization.triton_fp8_rows import quantize_rows

if DEVICE == "cuda" and fp8_activations.fp8_variant(torch.device(DEVICE)) != "w8a8":
    pytest.skip("W8A8 runs on compute capability 8.9+", allow_module_level=True)
BF16, FP32 = torch.bfloat16, torch.float32
E4M3_MAX = 448.0


@pytest.fixture(autouse=True)
def _w8a8(monkeypatch):
    """The interpreter (a CPU device) runs W8A16 unless told otherwise."""
    monkeypatch.setattr(fp8_activations, "fp8_variant", lambda device: "w8a8")


def reference_quantize_rows(x):
    """x [M, K] -> (e4m3 [M, K], scale [M]): max(|row|) / 448 per row, float32's smallest
    normal for an all-zero row, values clamped and rounded by torch's own e4m3 cast."""
    x32 = x.float()
    scale = torch.clamp(x32.abs().amax(dim=1) / E4M3_MAX, min=torch.finfo(torch.float32).tiny)
    values = torch.clamp(x32 / scale[:, None], -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return values, scale


def fake_quantized(x):
    """x [M, K] -> [M, K] float32: what W8A8 multiplies instead of x."""
    values, scale = reference_quantize_rows(x.cpu())
    return values.float() * scale[:, None]


def activations(num_rows, cols, dtype, seed=1, decades=2):
    """Rows of different magnitudes (10^-decades to 10^decades), the second all zero."""
    x = randn(num_rows, cols, seed=seed) * torch.logspace(-decades, decades, num_rows)[:, None]
    if num_rows > 1:
        x[1] = 0.0
    return x.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_rows_quantize_as_torch_does(dtype):
    """Bit for bit: the scales, and every e4m3 code, ties (x / scale halfway between two codes),
    subnormals and the clamp at 448 included."""
    x = activations(6, 300, dtype)
    # Row 0 at scale exactly 1 (its maximum is 448): multiples of 7 (codes, values between
    # two, and ties such as 84 between 80 and 88), subnormals k * 2^-9 and the ties between
    # them (2^-10 rounds to 0, 3 * 2^-10 to 2^-8), negatives.
    x[0] = 0.0
    x[0, :64] = (torch.arange(64) * 7.0).to(dtype)
    x[0, 64] = E4M3_MAX
    tiny = torch.tensor([1, 2, 3, 5, 7, 0.5, 1.5, 2.5]) * 2.0**-9
    x[0, 65:73] = tiny.to(dtype)
    x[0, 73:81] = -tiny.to(dtype)
    x[0, 81:145] = -x[0, :64]
    values, scale = quantize_rows(x)
    want_values, want_scale = reference_quantize_rows(x.cpu())
    assert torch.equal(scale.cpu(), want_scale)
    assert torch.equal(values.cpu().view(torch.uint8), want_values.view(torch.uint8))
    assert scale[1] == torch.finfo(torch.float32).tiny and not values[1].float().any()
    # The package's torch definition is the same quantization.
    package_values, package_scale = fp8_activations.quantize_rows_fp8(x.cpu())
    assert torch.equal(package_scale, want_scale)
    assert torch.equal(package_values.view(torch.uint8), want_values.view(torch.uint8))


# (method, group, K): per-channel scales with K off the K step (masked tail), 128-column
# groups (the 128x128 blocks of block_wise_fp8 / FP8_BLOCK checkpoints), 64-column groups
# (K steps of 64), and a 32-column group (the smallest W8A8 takes).
CASES = [
    ("fp8", None, 160),
    ("block_wise_fp8", 128, 256),
    ("block_wise_fp8", 64, 192),
    ("block_wise_fp8", 32, 96),
]
CASE_IDS = [f"{method}-g{group}-k{cols}" for method, group, cols in CASES]


# float32 activations: float32 rounding apart in the interpreter (the reference scales each
# product, the kernel the sum); compiled, Hopper's fp8 MMA sums each K step (<= 128 products)
# in an accumulator narrower than float32. Both far below W8A16's distance (1.8e-2 and more).
FP32_TOL = 1e-5 if DEVICE == "cpu" else 2e-3


def assert_close(got, expected, dtype):
    """Each row's error relative to its largest output. bf16: the result rounded to
    bfloat16."""
    tol = FP32_TOL if dtype == FP32 else 1e-2
    scale = expected.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)  # per row: rows differ 10^4
    torch.testing.assert_close((got.float().cpu() / scale), expected / scale, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_rows", [2, 33])
@pytest.mark.parametrize(("method", "group", "cols"), CASES, ids=CASE_IDS)
def test_matmul_matches_the_per_token_quantized_reference(method, group, cols, num_rows, dtype):
    weight = make_weight(method, group, (96, cols), dtype)
    x = activations(num_rows, cols, dtype)
    got = triton_gemm.quantized_matmul(x, weight, None)
    assert got.dtype == dtype and got.shape == (num_rows, 96)
    dense = weight.dequantize(FP32).cpu()
    expected = fake_quantized(x) @ dense.T
    assert_close(got, expected, dtype)
    assert not got[1].any()  # the all-zero row
    if dtype == FP32:  # the activations were quantized: W8A16's result is out of tolerance
        w8a16 = x.float().cpu() @ dense.T
        with pytest.raises(AssertionError):
            assert_close(got, w8a16, dtype)


def test_groups_w8a8_cannot_take_run_w8a16():
    """16-column groups (a K step of 16 is below an fp8 dot's minimum) keep model-dtype
    activations: the result is W8A16's, not the quantized activations'."""
    weight = make_weight("block_wise_fp8", 16, (64, 64), FP32)
    x = activations(5, 64, FP32)
    assert not triton_gemm.runs_w8a8(weight, 16, x.device)
    got = triton_gemm.quantized_matmul(x, weight, None)
    assert_close(got, x.float().cpu() @ weight.dequantize(FP32).cpu().T, FP32)


HIDDEN, INTER, EXPERTS, TOP_K = 256, 96, 4, 2
# gate_up's K = 256 in two 128-column groups; down's K = 96 makes 128-column groups 32 wide.
MOE_CASES = [("fp8", None, FP32), ("block_wise_fp8", 128, FP32), ("fp8", None, BF16)]


def reference_experts(x, ids, weights, gate_up, down, expert_start):
    """Per owned (token, slot): x's row quantized, gate_up, silu(gate) * up quantized per row,
    down, times the routing weight; slots added in order. All float32 on the CPU."""
    gate_up = gate_up.dequantize(FP32).cpu()
    down = down.dequantize(FP32).cpu()
    x_fake = fake_quantized(x)  # [M, H]: one row per token, shared by its slots
    out = torch.zeros(x.shape[0], HIDDEN)
    for token in range(x.shape[0]):
        for slot in range(TOP_K):
            expert = int(ids[token, slot]) - expert_start
            if not 0 <= expert < EXPERTS:
                continue
            gate, up = (x_fake[token : token + 1] @ gate_up[expert].T).chunk(2, dim=-1)
            act = F.silu(gate) * up  # [1, I]
            y = fake_quantized(act) @ down[expert].T  # [1, H]
            out[token] += float(weights[token, slot]) * y[0]
    return out


@pytest.mark.parametrize(
    ("method", "group", "dtype"), MOE_CASES, ids=[f"{m}-g{g}-{str(d)[6:]}" for m, g, d in MOE_CASES]
)
def test_fused_experts_match_the_per_token_quantized_reference(method, group, dtype):
    """Expert start 2 with ids outside [2, 6): pairs not owned here must be skipped. Token 1
    is all zeros."""
    gate_up = make_weight(method, group, (EXPERTS, 2 * INTER, HIDDEN), dtype, seed=3)
    down = make_weight(method, group, (EXPERTS, HIDDEN, INTER), dtype, seed=4)
    gen = torch.Generator().manual_seed(5)
    x = activations(5, HIDDEN, dtype, seed=6, decades=1)
    ids = torch.rand(5, EXPERTS + 2, generator=gen).argsort(-1)[:, :TOP_K]
    weights = torch.rand(5, TOP_K, generator=gen).to(dtype)
    got, _ = fused_moe.fused_experts(
        x, ids.to(DEVICE), weights.to(DEVICE), gate_up, down, 2, "triton"
    )
    assert got.dtype == dtype
    expected = reference_experts(x, ids, weights.float(), gate_up, down, 2)
    assert_close(got, expected, dtype)
    assert not got[1].any()
    if dtype == FP32:  # W8A16 on the same experts is out of tolerance
        w8a16, _ = fused_moe.fused_experts(
            x, ids.to(DEVICE), weights.to(DEVICE), gate_up.dequantize(dtype),
            down.dequantize(dtype), 2, "loop",
        )  # fmt: skip
        with pytest.raises(AssertionError):
            assert_close(w8a16, expected, dtype)


def test_the_device_decides_the_variant(monkeypatch):
    monkeypatch.undo()  # the real fp8_variant
    capability = {}
    monkeypatch.setattr(fp8_activations, "_cuda_capability", lambda index: capability["now"])
    cuda = torch.device("cuda", 0)
    for now, variant in [((9, 0), "w8a8"), ((8, 9), "w8a8"), ((10, 0), "w8a8"),
                         ((8, 6), "w8a16-bytes"), ((8, 0), "w8a16-bytes")]:  # fmt: skip
        capability["now"] = now
        assert fp8_activations.fp8_variant(cuda) == variant, now
    assert fp8_activations.fp8_variant(torch.device("cpu")) == "w8a16"
    capability["now"] = (9, 0)
    assert triton_gemm.weight_format(scheme_for("fp8"), cuda) == "fp8"
    fp8 = make_weight("fp8", None, (32, 64), FP32)
    assert triton_gemm.runs_w8a8(fp8, 0, cuda)
    assert not triton_gemm.runs_w8a8(make_weight("wint8", None, (32, 64), FP32), 0, cuda)
    capability["now"] = (8, 0)
    assert triton_gemm.weight_format(scheme_for("fp8"), cuda) == "fp8bits"
    assert not triton_gemm.runs_w8a8(fp8, 0, cuda)
