"""The quantization schemes and their CPU matmuls: rounding bounds, the int4 byte layout,
scales that ignore how a tensor is sliced over ranks, and each CPU kernel against a
dequantize-then-matmul reference."""

from __future__ import annotations

import pytest
import torch

from ernie_cluster.model.fused_moe import fused_experts
from ernie_cluster.quantization.schemes import (
    cell_absmax,
    dequantize,
    pack_int4,
    quantize,
    quantize_with_scales,
    scales_from_absmax,
    scheme_for,
    unpack_int4,
)
from ernie_cluster.quantization.weight import QuantizedWeight, linear

METHODS = ("wint8", "wint4", "fp8", "block_wise_fp8")


def random_weight(*shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * shape[-1] ** -0.5).to(dtype)


def test_int4_bytes_hold_even_columns_in_the_low_nibble():
    values = torch.tensor([[-8, 7, 0, -1, 3, -5]], dtype=torch.int8)
    packed = pack_int4(values)
    # stored as q + 8: (0, 15) -> 0xF0, (8, 7) -> 0x78, (11, 3) -> 0x3B
    assert packed.tolist() == [[0xF0, 0x78, 0x3B]]
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(2)[None]
    assert torch.equal(unpack_int4(pack_int4(every)), every)


def test_int8_rounds_to_nearest_within_half_a_step_and_uses_the_full_range():
    weight = random_weight(16, 96)
    qweight, scale = quantize(weight, scheme_for("wint8"))
    assert qweight.dtype == torch.int8 and scale.shape == (16, 1)
    assert torch.equal(qweight.abs().amax(-1), torch.full((16,), 127, dtype=torch.int8))
    error = (dequantize(qweight, scale, scheme_for("wint8"), torch.float32) - weight).abs()
    assert (error <= scale / 2 + 1e-7).all()


def test_int4_groups_scale_each_block_of_columns_on_its_own():
    weight = random_weight(8, 256)
    weight[:, 128:] *= 100  # the second group is much larger than the first
    scheme = scheme_for("wint4")
    qweight, scale = quantize(weight, scheme)
    assert qweight.shape == (8, 128) and scale.shape == (8, 2)
    group_max = weight.abs().unflatten(-1, (2, 128)).amax(-1)  # [8, 2]
    torch.testing.assert_close(scale, group_max / 7, rtol=1e-6, atol=0)
    error = (dequantize(qweight, scale, scheme, torch.float32) - weight).abs()
    step = scale.repeat_interleave(128, dim=-1)
    assert (error <= step / 2 + 1e-6).all()


def test_fp8_values_are_torch_e4m3_of_the_scaled_weight():
    weight = random_weight(8, 128)
    qweight, scale = quantize(weight, scheme_for("fp8"))
    assert qweight.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(
        qweight.float().abs().amax(-1), torch.full((8,), 448.0), rtol=0.07, atol=0
    )
    assert torch.equal(qweight.float(), (weight / scale).to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("world", [2, 4])
def test_row_parallel_slices_quantize_to_the_whole_tensors_values(method, world):
    """A rank holding columns [r*K/W, (r+1)*K/W) agrees with one rank holding them all once the
    cells' maxima are combined by MAX (the all-reduce quantization/apply runs)."""
    scheme = scheme_for(method)
    weight = random_weight(12, 640, seed=1)
    weight[:, 300:340] *= 20  # a cell whose maximum lives on one rank only
    whole_q, whole_scale = quantize(weight, scheme)
    expected = dequantize(whole_q, whole_scale, scheme, torch.float32)
    width = 640 // world
    slices = [(r * width, weight[:, r * width : (r + 1) * width]) for r in range(world)]
    combined = torch.stack([cell_absmax(w, scheme, start, 640) for start, w in slices]).amax(0)
    parts = []
    for start, w in slices:
        scale = scales_from_absmax(combined, scheme, start, width, 640, torch.float32)
        parts.append(
            dequantize(quantize_with_scales(w, scale, scheme), scale, scheme, torch.float32)
        )
    assert torch.equal(torch.cat(parts, dim=-1), expected)


def make_weight(method, shape, dtype, seed=0):
    scheme = scheme_for(method)
    weight = random_weight(*shape, seed=seed, dtype=dtype)
    qweight, scale = quantize(weight, scheme)
    return QuantizedWeight(qweight, scale, scheme, shape, dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 256), (64, 192)], ids=["K256", "K192"])
def test_cpu_linear_equals_dequantize_then_matmul(method, dtype, shape):
    weight = make_weight(method, shape, dtype)
    x = random_weight(5, shape[-1], seed=2, dtype=dtype)
    want = x.float() @ weight.dequantize(torch.float32).T
    got = linear(x, weight)
    assert got.dtype == dtype and got.shape == (5, shape[0])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("method", METHODS)
def test_cpu_quantized_experts_equal_the_loop_on_dequantized_experts(method):
    num_experts, hidden, inter = 6, 128, 64
    dtype = torch.float32
    gate_up = make_weight(method, (num_experts, 2 * inter, hidden), dtype, seed=3)
    down = make_weight(method, (num_experts, hidden, inter), dtype, seed=4)
    x = random_weight(9, hidden, seed=5)
    gen = torch.Generator().manual_seed(6)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:2] for _ in range(9)])
    weights = torch.rand(9, 2, generator=gen)
    got, counts = fused_experts(x, ids, weights, gate_up, down, 0)
    want, want_counts = fused_experts(
        x, ids, weights, gate_up.dequantize(), down.dequantize(), 0, method="loop"
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, want_counts)


def test_grouped_mm_refuses_quantized_experts():
    gate_up = make_weight("wint8", (2, 32, 16), torch.float32)
    down = make_weight("wint8", (2, 16, 16), torch.float32)
    x = torch.randn(3, 16)
    ids = torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="not grouped_mm"):
        fused_experts(x, ids, None, gate_up, down, 0, method="grouped_mm")
