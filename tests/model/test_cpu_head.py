"""The prepacked CPU lm_head (model/cpu_head) against F.linear / a float64 oracle, and its
repacking when the weight is written after the first call (as loading does)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ernie_cluster import cpu_bf16
from ernie_cluster.model.cpu_head import PackedHead


def test_float32_logits_equal_f_linear_and_follow_weight_updates():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 64, generator=gen)
    head = PackedHead()
    for rows in (1, 7, 40):
        x = torch.randn(rows, 64, generator=gen)
        torch.testing.assert_close(head(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    weight.mul_(-2.0)  # written in place, as the loader does after the model is built
    x = torch.randn(3, 64, generator=gen)
    torch.testing.assert_close(head(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [False, True], ids=["widened", "native"])
def test_bfloat16_logits_are_a_bfloat16_gemm(monkeypatch, native):
    if native and not cpu_bf16.native_bf16():
        pytest.skip("this CPU has no native bfloat16 (oneDNN refuses to pack bf16 weights)")
    monkeypatch.setattr(cpu_bf16, "native_bf16", lambda: native)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(500, 96, generator=gen).bfloat16()
    x = torch.randn(5, 96, generator=gen).bfloat16()
    with torch.inference_mode():  # as the engine calls it
        got = PackedHead()(x, weight)
    assert got.dtype == torch.bfloat16
    exact = x.double() @ weight.double().T
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 7)
    assert ((got.double() - exact).abs() <= ulp).all()
