"""Expert-parallel dispatch/combine over gloo: bit-identical to the single-process MoE math at
W = 1, 2 and 4 under skewed routing (one rank receives every pair, a buffer filled exactly),
ranks without tokens, fewer tokens than ranks, unrouted slots and a configured capacity (met and
exceeded); and, counting aten ops on each rank, no host sync when the step's largest local
batch is given, the same ops for 1 and 256 tokens, and one sync otherwise.

The experts are elementwise ((x * a_e + b_e) * x), so a row's output does not depend on which
batch it was computed in and any difference between world sizes is a routing or summation bug.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from ernie_cluster.distributed.communicator import Communicator
from ernie_cluster.distributed.expert_dispatch import dispatch_combine
from ernie_cluster.distributed.process_group import free_port

HIDDEN, NUM_EXPERTS = 8, 8
SYNC_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.item",
    "aten.is_nonzero",
    "aten.equal",
    "aten.bincount",
    "aten.masked_select",
}


def expert_params() -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert scale and shift [E, H]."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(NUM_EXPERTS, HIDDEN, generator=gen), torch.randn(
        NUM_EXPERTS, HIDDEN, generator=gen
    )


def make_run_experts(start: int, stop: int, received: list | None = None):
    """The run_experts contract for experts [start, stop), written out slot by slot."""
    scale, shift = expert_params()

    def run_experts(x, ids, weights):
        if received is not None:
            received.append(ids.clone())
        owned = (ids >= start) & (ids < stop)  # [M, k]
        safe = torch.where(owned, ids, start)
        out = torch.zeros(x.shape, dtype=torch.float32)
        for j in range(ids.shape[1]):
            y = (x * scale[safe[:, j]].to(x.dtype) + shift[safe[:, j]].to(x.dtype)) * x
            y = torch.where(owned[:, j, None], y, 0)
            out = out + (y if weights is None else weights[:, j, None] * y).float()
        return out.to(x.dtype)

    return run_experts


def reference(hidden, ids, weights):
    """The MoE math token by token: each weighted product in the activation dtype, summed in
    float32 in slot order."""
    scale, shift = expert_params()
    out = torch.empty_like(hidden)
    for t in range(hidden.shape[0]):
        acc = torch.zeros(HIDDEN)
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= 0:
                x = hidden[t]
                y = (x * scale[e].to(x.dtype) + shift[e].to(x.dtype)) * x
                acc = acc + (weights[t, j] * y).float()
        out[t] = acc.to(hidden.dtype)
    return out


@dataclass
class Case:
    hidden: list[torch.Tensor]  # per rank [n_r, H]
    ids: list[torch.Tensor]  # per rank [n_r, k]
    weights: list[torch.Tensor]  # per rank [n_r, k]
    kwargs: dict = field(default_factory=dict)  # max_local_tokens / capacity


def _distinct(gen, allowed: list[int], k: int) -> list[int]:
    return [allowed[i] for i in torch.randperm(len(allowed), generator=gen)[:k].tolist()]


def make_case(name: str, world: int) -> Case:
    gen = torch.Generator().manual_seed(1)
    per_rank = NUM_EXPERTS // world
    experts_of = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(world)]
    everything = list(range(NUM_EXPERTS))
    k = 3 if name in ("full-buffer", "unrouted") else 2
    kwargs = {}
    counts = {
        "empty-ranks": [3] + [0] * (world - 1),
        "fewer-tokens-than-ranks": [1] * (world - 1) + [0],  # N = W - 1 tokens, 1 row per rank
        "all-to-one": [3 + r for r in range(world)],
    }.get(name, [5] * world)
    if name == "exact-size":  # ranks hold different n and do not say the largest
        counts = [4, 1, 0, 2][:world]
    else:
        kwargs["max_local_tokens"] = max(counts)
    hidden, ids, weights = [], [], []
    for n in counts:
        rows = []
        for _ in range(n):
            if name in ("all-to-one", "capacity-exceeded"):
                rows.append(_distinct(gen, experts_of[-1], k))
            elif name == "full-buffer":  # as many pairs as allowed on rank 0, slots shuffled
                on_first = min(k, per_rank)
                row = _distinct(gen, experts_of[0], on_first)
                row += _distinct(gen, everything[per_rank:], k - on_first)
                rows.append([row[i] for i in torch.randperm(k, generator=gen).tolist()])
            else:
                rows.append(_distinct(gen, everything, k))
        token_ids = torch.tensor(rows, dtype=torch.long).reshape(n, k)
        if name == "unrouted":
            token_ids[torch.rand(n, k, generator=gen) < 0.4] = -1
            token_ids[0] = -1
        hidden.append(torch.randn(n, HIDDEN, generator=gen))
        ids.append(token_ids)
        weights.append(torch.rand(n, k, generator=gen))
    if name == "bfloat16":
        hidden = [h.bfloat16() for h in hidden]
        weights = [w.bfloat16() for w in weights]
    if name == "capacity-met":  # exactly the largest count any rank sends to one rank
        sent = [torch.bincount(i[i >= 0] // per_rank, minlength=world) for i in ids]
        kwargs["capacity"] = int(torch.stack(sent).max())
    if name == "capacity-exceeded":
        kwargs["capacity"] = 1
    return Case(hidden, ids, weights, kwargs)


CASES = [
    "uniform",
    "bfloat16",
    "all-to-one",
    "full-buffer",
    "empty-ranks",
    "fewer-tokens-than-ranks",
    "unrouted",
    "exact-size",
    "capacity-met",
    "capacity-exceeded",
]


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(rank: int, world: int, num_tokens: int, **kwargs) -> dict[str, int]:
    """Ops of one dispatch_combine on this rank, with random top-2 routing."""
    gen = torch.Generator().manual_seed(100 + rank)
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen)
    ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:2] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, 2, generator=gen)
    per_rank = NUM_EXPERTS // world
    run = make_run_experts(rank * per_rank, (rank + 1) * per_rank)
    comm = Communicator(rank, world)
    with OpCounter() as counter:
        dispatch_combine(hidden, ids, weights, run, per_rank, comm, **kwargs)
    return dict(counter.ops)


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        per_rank = NUM_EXPERTS // world
        results = {}
        for name in CASES:
            case = make_case(name, world)
            received: list[torch.Tensor] = []
            run = make_run_experts(rank * per_rank, (rank + 1) * per_rank, received)
            comm = Communicator(rank, world)
            out = dispatch_combine(
                case.hidden[rank],
                case.ids[rank],
                case.weights[rank],
                run,
                per_rank,
                comm,
                **case.kwargs,
            )
            recv = received[0] if received else torch.zeros(0, 1, dtype=torch.long)
            results[name] = (out, recv, comm.bytes_sent)
        results["ops"] = {n: count_ops(rank, world, n, max_local_tokens=n) for n in (1, 256)}
        results["ops"]["capacity"] = count_ops(rank, world, 256, max_local_tokens=256, capacity=4)
        results["ops"]["exact"] = count_ops(rank, world, 256)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request, tmp_path_factory):
    """Every case run once at world size W over gloo -> (W, per-rank results)."""
    world = request.param
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    mp.start_processes(
        _rank_main, args=(world, free_port(), str(out_dir)), nprocs=world, start_method="spawn"
    )
    return world, [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("name", CASES)
def test_single_rank_is_the_reference(name):
    case = make_case(name, 1)
    hidden, ids, weights = (torch.cat(x) for x in (case.hidden, case.ids, case.weights))
    run = make_run_experts(0, NUM_EXPERTS)
    out = dispatch_combine(hidden, ids, weights, run, NUM_EXPERTS, Communicator())
    assert torch.equal(out, reference(hidden, ids, weights))


class LoopbackComm(Communicator):
    """Rank 0 of W whose exchanges come straight back: with every expert run here, each pair's
    row returns to the slot it left from, which checks the buffer layout without processes."""

    def all_to_all_fixed(self, x, valid_rows=None):
        return x

    def all_reduce(self, x, op=None):
        return x


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", CASES)
def test_loopback_buffer_layout(name, world):
    case = make_case(name, world)
    hidden, ids, weights = case.hidden[0], case.ids[0], case.weights[0]
    run = make_run_experts(0, NUM_EXPERTS)
    comm = LoopbackComm(0, world)
    out = dispatch_combine(hidden, ids, weights, run, NUM_EXPERTS // world, comm, **case.kwargs)
    assert torch.equal(out, reference(hidden, ids, weights))


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_matches_single_process_bit_for_bit(ranks, name):
    world, results = ranks
    case = make_case(name, world)
    per_rank = NUM_EXPERTS // world
    all_ids = torch.cat(case.ids).reshape(-1)
    for rank in range(world):
        out, recv, bytes_sent = results[rank][name]
        assert torch.equal(out, reference(case.hidden[rank], case.ids[rank], case.weights[rank]))
        # every pair arrives exactly once at its owner, nothing else but padding (-1) arrives
        owned = all_ids[(all_ids // per_rank == rank) & (all_ids >= 0)]
        got = recv.reshape(-1)
        assert torch.equal(got[got >= 0].sort().values, owned.sort().values)
        assert set(got[got < 0].tolist()) <= {-1}
        # bytes to other ranks: payload (rows out, their int32 ids, rows back) and whole buffers
        row = HIDDEN * case.hidden[rank].element_size()
        dests = [i[i >= 0] // per_rank for i in case.ids]
        sent = int((dests[rank] != rank).sum())
        came = sum(int((dests[s] == rank).sum()) for s in range(world) if s != rank)
        assert bytes_sent["all_to_all"] == sent * (row + 4) + came * row
        cap = recv.shape[0] // world
        assert bytes_sent["all_to_all_padded"] == (world - 1) * cap * (2 * row + 4)


@pytest.mark.slow
def test_buffer_sizes(ranks):
    world, results = ranks
    last = world - 1
    case = make_case("all-to-one", world)
    num_pairs = sum(i.numel() for i in case.ids)
    received = [int((results[r]["all-to-one"][1] >= 0).sum()) for r in range(world)]
    assert received == [0] * last + [num_pairs]
    # capacity 1 is exceeded: the buffer grows to the largest per-destination count
    case = make_case("capacity-exceeded", world)
    need = max(i.numel() for i in case.ids)
    for rank in range(world):
        assert results[rank]["capacity-exceeded"][1].shape == (world * need, 1)
    # capacity met: the configured size is used as is
    capacity = make_case("capacity-met", world).kwargs["capacity"]
    assert results[0]["capacity-met"][1].shape == (world * capacity, 1)
    # worst case for the largest local batch: n * min(k, experts per rank)
    case = make_case("full-buffer", world)
    worst = case.kwargs["max_local_tokens"] * min(3, NUM_EXPERTS // world)
    assert results[0]["full-buffer"][1].shape == (world * worst, 1)
    # without max_local_tokens the buffer is the exact need
    case = make_case("exact-size", world)
    sent = [
        torch.bincount(i.reshape(-1) // (NUM_EXPERTS // world), minlength=world) for i in case.ids
    ]
    assert results[0]["exact-size"][1].shape == (world * int(torch.stack(sent).max()), 1)


@pytest.mark.slow
def test_no_host_sync_and_same_ops_for_any_batch(ranks):
    world, results = ranks
    for rank in range(world):
        ops = results[rank]["ops"]
        assert not SYNC_OPS & set(ops[1]), ops[1]
        assert not SYNC_OPS & set(ops[256]), ops[256]
        assert ops[1] == ops[256]
        assert ops[1]["c10d.alltoall_base_"] == 3
        # a configured capacity below the worst case, or no max_local_tokens: exactly one sync
        assert ops["capacity"]["aten._local_scalar_dense"] == 1
        assert ops["exact"]["aten._local_scalar_dense"] == 1
