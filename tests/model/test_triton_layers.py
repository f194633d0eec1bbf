"""The GPU path's fused kernels against the torch reference they replace, in float32 and
bfloat16: residual add + RMSNorm, RoPE on q and k in place, SiLU·mul, the router, the sort of
(token, slot) pairs into expert tiles (whose layout must equal the torch one exactly) and the
combine of the slots; then the whole model on the GPU path against its CPU path.

Without a GPU the kernels run in Triton's CPU interpreter on CPU tensors; with one, the same
tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

pytest.importorskip("triton")

from ernie_cluster.attention import AttentionMetadata
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.model import fused_moe, triton_layers, triton_router
from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ernie_cluster.model.layers import InterleavedRotaryEmbedding, RMSNorm, SwiGLUMLP
from ernie_cluster.model.moe import Ernie4_5_MoeRouter
from ernie_cluster_tools.fixtures.presets import preset_config
from ernie_cluster_tools.kernel_counter import use_gpu_path

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def assert_close(got, expected, dtype):
    """fp32: float32 rounding apart. bf16: at most one bf16 step apart (the kernels round where
    the reference rounds, but may differ in the last float32 bit before rounding)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-2, rtol=8e-3)


@DTYPES
@pytest.mark.parametrize("hidden", [64, 200])
def test_rms_norm_and_residual_add(dtype, hidden):
    norm = RMSNorm(hidden, 1e-5, dtype).to(DEVICE)
    norm.weight.data.copy_(randn(hidden, seed=1, scale=0.5).to(dtype) + 1)
    x, residual = randn(7, hidden, dtype=dtype, seed=2), randn(7, hidden, dtype=dtype, seed=3)
    expected = norm(x)
    expected_normed, expected_sum = norm.add_and_norm(x, residual)
    norm.method = "triton"
    assert_close(norm(x), expected, dtype)
    normed, total = norm.add_and_norm(x, residual)
    assert torch.equal(total, expected_sum)  # one rounded add: the same bits
    assert_close(normed, expected_normed, dtype)


@DTYPES
def test_rope_rotates_q_and_k_in_place(dtype):
    rotary = InterleavedRotaryEmbedding(32, 500000.0, 4096).to(DEVICE)
    positions = torch.tensor([0, 5, 4095, 77, 1000], device=DEVICE)
    cos_sin = rotary.cos_sin(positions)
    qkv = randn(5, (6 + 2 * 2) * 32, dtype=dtype, seed=4)  # 6 q heads, 2 kv heads, D = 32
    q, k, _ = qkv.view(5, 10, 32).split([6, 2, 2], dim=1)
    expected_q, expected_k = rotary(cos_sin, q, k)
    rotary.method = "triton"
    got_q, got_k = rotary(cos_sin, q, k)
    assert got_q.data_ptr() == q.data_ptr()  # rotated where it lies in qkv
    assert_close(got_q, expected_q, dtype)
    assert_close(got_k, expected_k, dtype)


@DTYPES
def test_silu_and_mul(dtype):
    mlp = SwiGLUMLP(48, 80, dtype).to(DEVICE)
    mlp.gate_up_proj.data.copy_(randn(160, 48, seed=5, scale=0.3).to(dtype))
    mlp.down_proj.data.copy_(randn(48, 80, seed=6, scale=0.3).to(dtype))
    x = randn(9, 48, dtype=dtype, seed=7)
    expected = mlp(x)
    mlp.method = "triton"
    assert_close(mlp(x), expected, dtype)
    gate_up = randn(9, 160, dtype=dtype, seed=8)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_close(triton_layers.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up, dtype)


def make_router(num_experts, top_k, hidden, seed=9):
    config = ErnieMoeConfig(
        hidden_size=hidden,
        moe_num_experts=num_experts,
        moe_k=top_k,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    router = Ernie4_5_MoeRouter(config).to(DEVICE)
    router.weight.data.copy_(randn(num_experts, hidden, seed=seed))
    router.e_score_correction_bias.data.copy_(randn(1, num_experts, seed=seed + 1, scale=0.01))
    return router


@DTYPES
@pytest.mark.parametrize(("num_experts", "top_k", "tokens"), [(64, 6, 21), (8, 2, 5), (20, 3, 1)])
def test_router_matches_the_torch_router(dtype, num_experts, top_k, tokens):
    router = make_router(num_experts, top_k, hidden=96)
    hidden = randn(tokens, 96, dtype=dtype, seed=11)
    is_real = torch.arange(tokens, device=DEVICE) < tokens - 1
    expected_ids, expected_weights = router(hidden, is_real)
    router.method = "triton"
    ids, weights = router(hidden, is_real)
    assert ids.dtype == torch.int64 and (ids[-1] == -1).all()
    assert torch.equal(ids, expected_ids)
    assert_close(weights, expected_weights, dtype)


@pytest.mark.parametrize(
    ("tokens", "top_k", "start", "num_local", "block_m"),
    [(50, 6, 2, 16, 16), (1, 6, 0, 64, 16), (300, 6, 0, 64, 64), (40, 1, 0, 8, 16)],
)
def test_sort_to_tiles_gives_the_torch_layout(tokens, top_k, start, num_local, block_m):
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(-2, start + num_local + 4, (tokens, top_k), generator=gen).to(DEVICE)
    local, order, counts = fused_moe.sort_pairs(ids, start, num_local)
    expected_pairs, expected_experts = fused_moe.align_to_tiles(local, order, counts, block_m)
    num_tiles = fused_moe.max_tiles(tokens * top_k, num_local, block_m)
    totals = torch.full((num_local,), 5, dtype=torch.int64, device=DEVICE)
    tile_pairs, tile_experts = triton_router.sort_to_tiles(
        ids, start, num_local, block_m, num_tiles, totals
    )
    assert torch.equal(tile_pairs, expected_pairs)
    assert torch.equal(tile_experts, expected_experts)
    assert torch.equal(totals, counts[:num_local] + 5)  # added into, not overwritten


@DTYPES
@pytest.mark.parametrize("all_owned", [True, False])
def test_combine_sums_slots_in_order_then_adds(dtype, all_owned):
    """The same float32 adds in the same order as fused_moe.sum_slots, then one rounded add:
    the same bits as the torch ops it replaces. Slots not owned here are skipped (their rows
    hold garbage: NaN here)."""
    tokens, top_k, hidden, start, num_local = 5, 3, 48, 4, 8
    gen = torch.Generator().manual_seed(12)
    ids = torch.randint(start, start + num_local, (tokens, top_k), generator=gen)
    if not all_owned:
        ids[0, 1], ids[3, 0], ids[4, 2] = -1, start + num_local, start - 1
    ids = ids.to(DEVICE)
    weighted = randn(tokens * top_k, hidden, dtype=dtype, seed=13)
    owned = ((ids >= start) & (ids < start + num_local)).view(-1)
    weighted[~owned] = float("nan")
    add_to = randn(tokens, hidden, dtype=dtype, seed=14)
    masked = torch.where(owned[:, None], weighted, 0.0).view(tokens, top_k, hidden)
    expected = fused_moe.sum_slots(masked, dtype)
    got = triton_router.combine(weighted, ids, start, num_local, dtype, all_owned=False)
    assert torch.equal(got, expected)
    got = triton_router.combine(weighted, ids, start, num_local, dtype, all_owned, add_to)
    assert torch.equal(got, expected + add_to)


@DTYPES
def test_model_forward_on_the_gpu_path_matches_the_cpu_path(dtype):
    """The whole model (tiny preset: 4 layers, 8 experts top-2) with every fused kernel, Triton
    attention and the Triton MoE against its torch path, on a prefill then a decode step."""
    config = ErnieMoeConfig.from_dict(preset_config("tiny"))
    model = Ernie4_5_MoeForCausalLM(config, dtype).to(DEVICE)
    gen = torch.Generator().manual_seed(15)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    steps = [  # (query lens, context lens, token ids)
        ([5, 3], [5, 3], [7, 8, 9, 10, 11, 12, 13, 14]),
        ([1, 1], [6, 4], [15, 16]),
    ]
    outputs = []
    for gpu_path in (False, True):
        use_gpu_path(model, gpu_path)
        caches = [torch.zeros(2, 4 * 16, 2, 16, dtype=dtype, device=DEVICE) for _ in range(4)]
        model.bind_kv_caches(caches)
        for query_lens, context_lens, token_ids in steps:
            meta = AttentionMetadata.build(query_lens, context_lens, [[0], [2]], 16, DEVICE)
            positions = torch.cat(
                [torch.arange(c - q, c) for q, c in zip(query_lens, context_lens, strict=True)]
            ).to(DEVICE)
            ids = torch.tensor(token_ids, device=DEVICE)
            outputs.append(model(ids, positions, meta))
    cpu, gpu = outputs[:2], outputs[2:]
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    for want, got in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
