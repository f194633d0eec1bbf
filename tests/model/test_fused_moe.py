"""The sync-free routed experts (model/fused_moe, model/triton_moe) against a per-expert loop.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors (set before triton
is imported); with one, the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import itertools
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.distributed.communicator import Communicator
from ernie_cluster.model import fused_moe, triton_moe
from ernie_cluster.model.moe import Ernie4_5_MoeExperts, Ernie4_5_MoeSparseMoeBlock
from ernie_cluster.model.sharding import ShardSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SYNC_OPS = {"_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal"}


def reference(x, topk_ids, topk_weights, gate_up, down, expert_start):
    """The pre-fused experts: one matmul pair per (slot, expert) over the rows routed to it,
    weighted in x's dtype, then summed in float32 in slot order."""
    num_local = gate_up.shape[0]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for slot in range(topk_ids.shape[1]):
        local = topk_ids[:, slot] - expert_start
        expert_out = torch.zeros_like(x)
        for expert in range(num_local):
            rows = (local == expert).nonzero().squeeze(1)
            if rows.numel():
                gate, up = F.linear(x[rows], gate_up[expert]).chunk(2, dim=-1)
                expert_out[rows] = F.linear(F.silu(gate) * up, down[expert])
        if topk_weights is not None:
            expert_out = expert_out * topk_weights[:, slot, None]
        out += expert_out.float()
    return out.to(x.dtype)


def make_weights(num_experts, hidden, inter, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inter, generator=gen) * inter**-0.5
    return gate_up.to(DEVICE, dtype), down.to(DEVICE, dtype)


def make_routing(kind, num_tokens, top_k, num_experts, expert_start, dtype, seed=0):
    """(x [M, H=128], topk_ids [M, k], topk_weights [M, k]) for one routing pattern."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, 128, generator=gen)
    if kind == "one-expert":  # every row to expert start + 3 in slot 0, the rest elsewhere
        ids = torch.full((num_tokens, top_k), -1)
        ids[:, 0] = expert_start + 3
    elif kind == "few-experts":  # experts 1, 4 and 5 only; the others get nothing
        ids = torch.tensor([1, 4, 5])[torch.randint(0, 3, (num_tokens, top_k), generator=gen)]
        ids += expert_start
    else:  # "mixed": distinct experts per row, some -1 and some outside [start, stop)
        ids = torch.rand(num_tokens, num_experts + 8, generator=gen).argsort(-1)[:, :top_k]
        ids = ids + expert_start - 4
        ids[torch.rand(num_tokens, top_k, generator=gen) < 0.2] = -1
    weights = torch.rand(num_tokens, top_k, generator=gen)
    return x.to(DEVICE, dtype), ids.to(DEVICE), weights.to(DEVICE, dtype)


def skip_without(method):
    if method == "triton" and not triton_moe.is_available():
        pytest.skip("triton is not installed")


def assert_matches(got, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


# (tokens, top_k, experts, expert_start, routing)
CASES = [
    (5, 2, 8, 0, "mixed"),
    (24, 6, 16, 4, "mixed"),
    (1, 6, 16, 0, "mixed"),
    (19, 2, 8, 0, "one-expert"),
    (12, 6, 8, 2, "few-experts"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-m{c[0]}-k{c[1]}-e{c[2]}" for c in CASES])
@pytest.mark.parametrize("method", ["triton", "grouped_mm", "loop", "loop-per-op", "loop-padded"])
def test_matches_per_expert_loop(method, case, dtype, monkeypatch):
    """loop: its GEMMs written in place where it can (plain weights, no bf16 widening);
    loop-per-op: the general form quantized and widened weights take; loop-padded: the
    batched GEMMs over padded experts (native-bf16 CPUs at decode sizes), forced here."""
    skip_without(method)
    if method == "loop-per-op":
        monkeypatch.setattr(fused_moe, "_mm_in_place", lambda *args: False)
        method = "loop"
    if method == "loop-padded":
        if DEVICE != "cpu":
            pytest.skip("the padded loop is a CPU path")
        monkeypatch.setattr(fused_moe, "_pads_cheaply", lambda rows, counts: max(counts) > 0)
        method = "loop"
    if method == "grouped_mm" and DEVICE == "cuda" and dtype == torch.float32:
        pytest.skip("torch._grouped_mm on CUDA takes bfloat16 only (else a syncing fallback)")
    num_tokens, top_k, num_experts, start, kind = case
    gate_up, down = make_weights(num_experts, 128, 64, dtype)
    x, ids, weights = make_routing(kind, num_tokens, top_k, num_experts, start, dtype)
    got, counts = fused_moe.fused_experts(x, ids, weights, gate_up, down, start, method)
    assert got.dtype == dtype and got.shape == x.shape
    assert_matches(got, reference(x, ids, weights, gate_up, down, start), dtype)
    local = ids - start
    expected_counts = torch.stack([(local == e).sum() for e in range(num_experts)])
    assert torch.equal(counts, expected_counts)


@pytest.mark.parametrize("method", ["triton", "grouped_mm"])
def test_padding_rows_of_a_fixed_capacity_buffer(method):
    """Received rows at W > 1: k = 1, no weights, most rows padding (id -1)."""
    skip_without(method)
    gate_up, down = make_weights(8, 128, 64, torch.bfloat16)
    x, _, _ = make_routing("mixed", 40, 1, 8, 0, torch.bfloat16)
    ids = torch.full((40, 1), -1, device=DEVICE)
    ids[[0, 1, 2, 7, 30]] = torch.tensor([[3], [3], [0], [7], [3]], device=DEVICE)
    got, counts = fused_moe.fused_experts(x, ids, None, gate_up, down, 0, method)
    assert_matches(got, reference(x, ids, None, gate_up, down, 0), torch.bfloat16)
    assert (got[ids[:, 0] < 0] == 0).all()
    assert counts.tolist() == [1, 0, 0, 3, 0, 0, 0, 1]


def test_no_tokens():
    gate_up, down = make_weights(8, 128, 64, torch.float32)
    x = torch.zeros(0, 128, device=DEVICE)
    ids = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    for method in ("triton", "grouped_mm") if triton_moe.is_available() else ("grouped_mm",):
        got, counts = fused_moe.fused_experts(x, ids, None, gate_up, down, 0, method)
        assert got.shape == (0, 128) and counts.sum() == 0


def test_tiles_hold_each_owned_pair_once():
    torch.manual_seed(0)
    ids = torch.randint(-2, 20, (50, 6))
    local, order, counts = fused_moe.sort_pairs(ids, 2, 16)
    block_m = 16
    tile_pairs, tile_experts = fused_moe.align_to_tiles(local, order, counts, block_m)
    assert tile_experts.numel() == fused_moe.max_tiles(300, 16, block_m)
    used = tile_experts >= 0
    assert used.sum() == ((counts[:16] + block_m - 1) // block_m).sum()
    assert (tile_experts[used].diff() >= 0).all() and not used[used.sum() :].any()
    by_tile = tile_pairs.view(-1, block_m)[used]  # [used tiles, block_m]
    real = by_tile < 300
    owned = ((ids >= 2) & (ids < 18)).view(-1).nonzero().squeeze(1)
    assert sorted(by_tile[real].tolist()) == owned.tolist()
    pair_expert = (ids.view(-1) - 2)[by_tile.clamp(max=299)]
    assert (pair_expert == tile_experts[used, None])[real].all()


def test_max_tiles_is_an_upper_bound():
    block_m, num_experts = 4, 3
    for num_pairs in range(1, 11):
        bound = fused_moe.max_tiles(num_pairs, num_experts, block_m)
        for counts in itertools.product(range(num_pairs + 1), repeat=num_experts):
            if sum(counts) <= num_pairs:
                assert sum(-(-c // block_m) for c in counts) <= bound


def test_configs_fit_a_hopper_gpu():
    """Limits the interpreter does not check: power-of-two tiles, tl.dot dims >= 16, and the
    pipelined operand buffers within the shared memory of an H100/H200 (227 KB)."""
    for _, config in triton_moe.CONFIGS:
        for kernel, num_b_tiles in ((config.gate_up, 2), (config.down, 1)):
            for size in (config.block_m, kernel.block_n, kernel.block_k):
                assert size >= 16 and size & (size - 1) == 0
            assert kernel.num_warps in (4, 8)
            smem = triton_moe.shared_memory_bytes(config.block_m, kernel, num_b_tiles, 2)
            assert smem <= 192 * 1024, (config, smem)
    assert triton_moe.pick_config(6, 64).block_m == 16  # one decode token, top-6 of 64
    assert triton_moe.pick_config(256 * 6 * 16, 64).block_m == 128


# ---- the module: stats, op counts, compile ---------------------------------------------------


def moe_config(num_experts=64, top_k=6) -> ErnieMoeConfig:
    return ErnieMoeConfig(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        moe_num_experts=num_experts,
        moe_k=top_k,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )


def make_experts(num_experts=64, top_k=6, rank=0, world_size=1, dtype=torch.float32):
    config = moe_config(num_experts, top_k)
    experts = Ernie4_5_MoeExperts(config, ShardSpec(rank, world_size), dtype)
    gate_up, down = make_weights(experts.gate_up_proj.shape[0], 64, 32, dtype)
    experts.gate_up_proj.data.copy_(gate_up.cpu())
    experts.down_proj.data.copy_(down.cpu())
    return experts


def test_expert_load_counts_owned_pairs_only():
    experts = make_experts(num_experts=8, top_k=2, rank=1, world_size=2)  # experts 4..7
    x = torch.randn(4, 64)
    ids = torch.tensor([[4, 0], [5, 4], [-1, 7], [3, 2]])
    experts.forward_pairs(x, ids, torch.ones(4, 2))
    experts.forward_pairs(x[:1], ids[:1, :1], None)
    assert experts.tokens_per_expert.tolist() == [0, 0, 0, 0, 3, 1, 0, 1]


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def count_ops(fn, *args) -> list[str]:
    with torch.inference_mode(), OpCounter() as counter:
        fn(*args)
    return counter.ops


def test_same_ops_for_one_token_and_all_experts_active():
    block = Ernie4_5_MoeSparseMoeBlock(moe_config(), ShardSpec(), torch.float32, Communicator())
    block.experts.method = "grouped_mm"  # the sync-free torch path CUDA runs without Triton
    for param in block.parameters():
        param.data.normal_(0.0, 0.1)
    block.gate.weight.data.normal_(0.0, 1.0)  # routes 256 tokens to all 64 experts
    block.gate.e_score_correction_bias.data.zero_()
    gen = torch.Generator().manual_seed(0)
    one, many = torch.randn(1, 64, generator=gen), torch.randn(256, 64, generator=gen)
    many_ids = torch.rand(256, 64, generator=gen).argsort(-1)[:, :6]
    assert many_ids.unique().numel() == 64
    one_ids = many_ids[:1]
    pairs_one = count_ops(block.experts.forward_pairs, one, one_ids, torch.rand(1, 6))
    pairs_many = count_ops(block.experts.forward_pairs, many, many_ids, torch.rand(256, 6))
    assert pairs_one == pairs_many
    assert not SYNC_OPS & set(pairs_one), pairs_one
    assert block.gate(many)[0].unique().numel() == 64
    block_one, block_many = count_ops(block, one), count_ops(block, many)
    assert block_one == block_many
    assert not SYNC_OPS & set(block_one), block_one


def test_cpu_default_is_the_loop_whose_ops_follow_the_routing():
    """On a CPU "auto" runs the loop, and the counter sees its per-expert ops (on CPU .tolist()
    reads memory without an op; the compile test below is what catches such reads on the
    sync-free path)."""
    assert fused_moe.resolve_method("auto", torch.zeros(1), torch.zeros(1, 2, 1)) == "loop"
    experts = make_experts()  # method "auto"
    x = torch.randn(3, 64)
    one_expert = count_ops(experts.forward_pairs, x, torch.ones(3, 6, dtype=torch.long), None)
    many_experts = count_ops(experts.forward_pairs, x, torch.arange(18).view(3, 6), None)
    assert len(one_expert) < len(many_experts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sync_free_path_compiles_whole(dtype):
    """A graph break or a data-dependent shape would fail here: the CUDA-graph-safety proxy."""
    experts = make_experts(dtype=dtype)
    experts.method = "grouped_mm"
    torch._dynamo.reset()
    compiled = torch.compile(experts.forward_pairs, fullgraph=True, backend="eager")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 64, generator=gen).to(dtype)
    ids = torch.rand(16, 64, generator=gen).argsort(-1)[:, :6]
    ids[3, 2] = -1
    weights = torch.rand(16, 6, generator=gen).to(dtype)
    with torch.inference_mode():
        got = compiled(x, ids, weights)
    expected = reference(x, ids, weights, experts.gate_up_proj, experts.down_proj, 0)
    assert_matches(got, expected, dtype)
