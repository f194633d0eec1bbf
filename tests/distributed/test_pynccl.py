"""The ctypes NCCL communicator (distributed/nccl) against a fake libnccl (tests/fake_nccl.py)
whose C signatures and enum values are written from nccl.h: declarations, the dtype and op
maps, the unique id's trip over a real gloo group, what each collective passes, errors, the
library search order, and the Communicator seam. With 2 GPUs, the real library: equal to
torch.distributed, and a captured all-reduce replays equal to eager (benchmarks/device_check.sh).
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from fake_nccl import NCCL_H, VERSION_CODE, FakeNccl, same_c_type

from ernie_cluster.distributed.communicator import Communicator
from ernie_cluster.distributed.nccl import NcclCommunicator, NcclLibrary
from ernie_cluster.distributed.nccl import library as nccl_library

GPUS = torch.cuda.device_count()
STREAM = SimpleNamespace(cuda_stream=0x5EA)  # what a torch.cuda.Stream gives NCCL: a handle


def fake_library(fake: FakeNccl | None = None) -> tuple[NcclLibrary, FakeNccl]:
    fake = fake or FakeNccl()
    return NcclLibrary("libnccl.so.2", dlopen=lambda path: fake), fake


def one_rank(device="cpu", world_size=1, rank=0) -> tuple[NcclCommunicator, FakeNccl]:
    library, fake = fake_library()
    uid = library.unique_id()
    return NcclCommunicator(library, uid, rank, world_size, torch.device(device)), fake


# ------------------------------------------------------------------ C declarations and enums


def test_every_binding_is_declared_as_nccl_h_declares_it():
    library, fake = fake_library()
    for name, (restype, argtypes) in NCCL_H.items():
        function = getattr(fake, name)
        assert same_c_type(function.restype, restype), name
        assert len(function.argtypes) == len(argtypes), name
        assert all(same_c_type(d, e) for d, e in zip(function.argtypes, argtypes, strict=True))
    assert ctypes.sizeof(nccl_library.ncclUniqueId) == 128
    assert library.version() == (2, 21, 5) and VERSION_CODE == 22105


@pytest.mark.parametrize(
    ("dtype", "code"),
    [
        (torch.int8, 0),
        (torch.uint8, 1),
        (torch.int32, 2),
        (torch.int64, 4),
        (torch.float16, 6),
        (torch.float32, 7),
        (torch.float64, 8),
        (torch.bfloat16, 9),
        (torch.float8_e4m3fn, 10),
        (torch.float8_e5m2, 11),
    ],
)
def test_torch_dtypes_map_to_nccl_h_values(dtype, code):
    assert nccl_library.nccl_dtype(dtype) == code


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64, torch.float8_e4m3fnuz])
def test_dtypes_nccl_lacks_raise(dtype):
    with pytest.raises(ValueError, match=str(dtype)):
        nccl_library.nccl_dtype(dtype)


def test_reduce_ops_map_to_nccl_h_values():
    ops = dist.ReduceOp
    pairs = [(ops.SUM, 0), (ops.PRODUCT, 1), (ops.MAX, 2), (ops.MIN, 3), (ops.AVG, 4)]
    assert [nccl_library.nccl_reduce_op(op) for op, _ in pairs] == [code for _, code in pairs]
    with pytest.raises(ValueError, match="BAND"):
        nccl_library.nccl_reduce_op(ops.BAND)


# ------------------------------------------------------------------ what the calls pass


def test_all_reduce_passes_pointer_count_dtype_op_comm_and_stream():
    comm, fake = one_rank()
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    comm.all_reduce(x, op=dist.ReduceOp.MAX, stream=STREAM)
    [(send, recv, count, dtype, op, handle, stream)] = fake.calls_of("ncclAllReduce")
    assert send == recv == x.data_ptr()  # in place
    assert (count, dtype, op, stream) == (6, 7, 2, STREAM.cuda_stream)
    assert handle == comm.comm.value == 0xC0DE00
    assert x.flatten().tolist() == list(range(6))  # one rank: the reduction is x itself


def test_collectives_default_to_the_current_stream_of_the_communicators_device(monkeypatch):
    comm, fake = one_rank()
    asked = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d: asked.append(d) or STREAM)
    comm.broadcast(torch.ones(4, dtype=torch.bfloat16), src=0)
    [(_, _, count, dtype, root, _, stream)] = fake.calls_of("ncclBroadcast")
    assert (count, dtype, root, stream) == (4, 9, 0, STREAM.cuda_stream)
    assert asked == [comm.device]


def test_gather_scatter_and_all_to_all_pass_the_per_rank_counts():
    comm, fake = one_rank(world_size=2)
    x = torch.zeros(4, 3, dtype=torch.float16)
    gathered = torch.empty(8, 3, dtype=torch.float16)
    comm.all_gather(gathered, x, stream=STREAM)
    assert fake.calls_of("ncclAllGather") == [
        (x.data_ptr(), gathered.data_ptr(), 12, 6, 0xC0DE00, STREAM.cuda_stream)
    ]
    scattered = torch.empty(2, 3, dtype=torch.float16)
    comm.reduce_scatter(scattered, x, stream=STREAM)
    assert fake.calls_of("ncclReduceScatter") == [
        (x.data_ptr(), scattered.data_ptr(), 6, 6, 0, 0xC0DE00, STREAM.cuda_stream)
    ]
    out = torch.empty_like(x)
    fake.calls.clear()
    comm.all_to_all(out, x, stream=STREAM)
    block = 6 * x.element_size()  # 2 rows of 3
    assert [call[0] for call in fake.calls] == ["ncclGroupStart"] + ["ncclSend", "ncclRecv"] * 2 + [
        "ncclGroupEnd"
    ]
    assert fake.calls_of("ncclSend") == [
        (x.data_ptr() + peer * block, 6, 6, peer, 0xC0DE00, STREAM.cuda_stream) for peer in (0, 1)
    ]
    assert fake.calls_of("ncclRecv") == [
        (out.data_ptr() + peer * block, 6, 6, peer, 0xC0DE00, STREAM.cuda_stream) for peer in (0, 1)
    ]


def test_nccl_errors_raise_with_their_string_and_groups_are_closed():
    comm, fake = one_rank(world_size=2)
    fake.fail["ncclAllReduce"] = 4
    with pytest.raises(RuntimeError, match=r"NCCL error 4 in ncclAllReduce: invalid argument"):
        comm.all_reduce(torch.ones(2), stream=STREAM)
    fake.fail["ncclSend"] = 6
    with pytest.raises(RuntimeError, match="remote process exited"):
        comm.all_to_all(torch.empty(2), torch.ones(2), stream=STREAM)
    assert fake.calls[-1][0] == "ncclGroupEnd"
    library, fake = fake_library()
    fake.fail["ncclCommInitRank"] = 5
    with pytest.raises(RuntimeError, match="ncclCommInitRank: invalid usage"):
        NcclCommunicator(library, library.unique_id(), 0, 1, "cpu")


def test_tensors_must_be_contiguous_on_the_communicators_device():
    comm, fake = one_rank()
    with pytest.raises(ValueError, match=r"contiguous \(shape \(3, 2\), stride \(1, 3\)\)"):
        comm.all_reduce(torch.ones(2, 3).t(), stream=STREAM)
    with pytest.raises(ValueError, match="x is on meta; this NCCL communicator is on cpu"):
        comm.all_reduce(torch.ones(2, device="meta"), stream=STREAM)
    gpu_comm, _ = one_rank(device="meta")  # a CPU tensor handed to a device communicator
    with pytest.raises(ValueError, match="x is on cpu"):
        gpu_comm.send(torch.ones(2), peer=0, stream=STREAM)
    with pytest.raises(ValueError, match="5 elements where the collective needs 4"):
        comm.all_gather(torch.empty(5), torch.ones(4), stream=STREAM)
    with pytest.raises(ValueError, match=r"out is torch\.float16 but x is torch\.float32"):
        comm.all_gather(torch.empty(4, dtype=torch.half), torch.ones(4), stream=STREAM)
    assert not fake.calls_of("ncclAllReduce") and not fake.calls_of("ncclAllGather")


# ------------------------------------------------------------------ the Communicator seam


def test_communicator_carries_its_collectives_on_nccl_not_torch_distributed(monkeypatch):
    assert not dist.is_initialized()  # torch.distributed could not carry them here
    nccl, fake = one_rank(world_size=2)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d: STREAM)
    comm = Communicator(0, 2, collectives=nccl)
    hidden = torch.ones(4, 8)
    assert comm.all_reduce(hidden) is hidden
    comm.all_gather_rows(torch.ones(2, 8))
    comm.reduce_scatter_rows(torch.ones(4, 8))
    comm.all_to_all_fixed(torch.ones(4, 8))
    comm.broadcast_from_first(torch.zeros(3, dtype=torch.long))
    names = [call[0] for call in fake.calls if call[0] not in ("ncclSend", "ncclRecv")]
    assert names[-6:] == [
        "ncclAllReduce",
        "ncclAllGather",
        "ncclReduceScatter",
        "ncclGroupStart",
        "ncclGroupEnd",
        "ncclBroadcast",
    ]
    assert comm.bytes_sent["all_reduce"] == 4 * 8 * 4  # ring: 2 (W - 1) / W of 128 bytes


def test_init_distributed_picks_nccl_only_for_cuda_graphs(monkeypatch):
    from ernie_cluster.distributed import process_group

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(dist, "new_group", lambda **k: ("gloo group", k["backend"]))
    made = []

    def from_group(group, device):
        made.append((group, device))
        return SimpleNamespace(library=SimpleNamespace(version=lambda: (2, 21, 5)))

    monkeypatch.setattr(NcclCommunicator, "from_group", staticmethod(from_group))
    cuda = torch.device("cuda", 0)
    init = process_group.init_distributed
    assert type(init(0, 2, "tcp://x", cuda).collectives).__name__ == "TorchCollectives"
    cpu = torch.device("cpu")
    comm = init(0, 2, "tcp://x", cpu, graph_safe_collectives=True)
    assert type(comm.collectives).__name__ == "TorchCollectives" and not made
    comm = init(1, 2, "tcp://x", cuda, graph_safe_collectives=True)
    assert made == [(("gloo group", "gloo"), cuda)] and comm.collectives is not None
    assert (comm.rank, comm.world_size) == (1, 2)


# ------------------------------------------------------------------ finding the library


def test_library_search_order_env_then_pip_package_then_system(monkeypatch, tmp_path):
    lib_dir = tmp_path / "site" / "nvidia" / "nccl" / "lib"
    lib_dir.mkdir(parents=True)
    (lib_dir / "libnccl.so.2").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in list(sys.modules) if m.split(".")[0] == "nvidia"]:
        monkeypatch.delitem(sys.modules, name)
    tried = []

    def dlopen(path):
        tried.append(path)
        raise OSError(f"cannot open {path}")

    monkeypatch.delenv(nccl_library.NCCL_SO_ENV, raising=False)
    with pytest.raises(RuntimeError) as error:
        NcclLibrary(dlopen=dlopen)
    assert tried == [str(lib_dir / "libnccl.so.2"), "libnccl.so.2"]
    message = str(error.value)
    assert all(path in message for path in tried) and nccl_library.NCCL_SO_ENV in message

    tried.clear()
    monkeypatch.setenv(nccl_library.NCCL_SO_ENV, "/opt/nccl/libnccl.so.2")
    fake = FakeNccl()
    library = NcclLibrary(dlopen=lambda path: tried.append(path) or fake)
    assert tried == ["/opt/nccl/libnccl.so.2"] and library.path == tried[0]
    with pytest.raises(RuntimeError, match=r"/opt/nccl/libnccl\.so\.2: cannot open"):
        NcclLibrary(dlopen=dlopen)  # an explicit path that fails is not silently replaced


# ------------------------------------------------------------------ unique id over gloo


def _id_rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    from rank_helpers import init_gloo

    init_gloo(rank, world, port)
    try:
        group = dist.new_group(backend="gloo")

        def sum_over_ranks(values, op):
            assert op == 0  # ncclSum
            dist.all_reduce(values, group=group)

        fake = FakeNccl(reduce_peers=sum_over_ranks)
        library = NcclLibrary("libnccl.so.2", dlopen=lambda path: fake)
        comm = NcclCommunicator.from_group(group, "cpu", library=library)
        x = torch.full((5,), float(rank + 1)) * torch.arange(5.0)
        comm.all_reduce(x, stream=STREAM)
        [(send, _, count, dtype, op, handle, stream)] = fake.calls_of("ncclAllReduce")
        result = {
            "generated": [data.hex() for data in fake.generated_ids],
            "init": [
                [data.hex(), nranks, r] for data, nranks, r in fake.calls_of("ncclCommInitRank")
            ],
            "all_reduce": [send == x.data_ptr(), count, dtype, op, handle, stream],
            "sum": x.tolist(),
        }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_unique_id_is_made_on_rank_0_and_broadcast_over_gloo(tmp_path):
    from rank_helpers import spawn_ranks

    spawn_ranks(_id_rank_main, 2, (str(tmp_path),), timeout_s=120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    [made] = ranks[0]["generated"]
    assert ranks[1]["generated"] == []
    assert [r["init"] for r in ranks] == [[[made, 2, 0]], [[made, 2, 1]]]
    for rank, result in enumerate(ranks):
        assert result["all_reduce"] == [True, 5, 7, 0, 0xC0DE00 + rank, STREAM.cuda_stream]
        assert result["sum"] == [3.0 * i for i in range(5)]  # (1 + 2) * i


# ------------------------------------------------------------------ the real library, 2 GPUs


def _real_rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    from ernie_cluster.distributed.process_group import init_distributed

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    comm = init_distributed(
        rank, world, f"tcp://127.0.0.1:{port}", device, graph_safe_collectives=True
    )
    result = {}
    try:
        nccl = comm.collectives
        result["version"] = list(nccl.library.version())
        x = torch.randn(4096, device=device) * (rank + 1)
        expected = x.clone()
        dist.all_reduce(expected)  # torch.distributed's NCCL group
        got = x.clone()
        nccl.all_reduce(got)
        result["eager_equals_torch"] = torch.equal(got, expected)
        rows = torch.arange(8 * 16, device=device, dtype=torch.bfloat16).view(8, 16) + rank
        torch_comm = Communicator(rank, world)
        # NOTE: a list, not all(...): a short-circuit would leave the other rank waiting.
        same = [
            torch.equal(getattr(comm, name)(rows.clone()), getattr(torch_comm, name)(rows.clone()))
            for name in ("all_gather_rows", "reduce_scatter_rows", "all_to_all_fixed")
        ]
        result["rows_equal_torch"] = all(same)
        # A captured all-reduce: replayed on new inputs it equals the eager one.
        static = torch.zeros(4096, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            nccl.all_reduce(static)  # warm-up outside the capture
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            nccl.all_reduce(static)
        replayed = []
        for step in range(3):
            static.copy_(x * (step + 1))
            graph.replay()
            eager = x * (step + 1)
            nccl.all_reduce(eager)
            replayed.append(torch.equal(static, eager))
        torch.cuda.synchronize(device)
        result["replay_equals_eager"] = replayed
        dist.barrier()
    finally:
        dist.destroy_process_group()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs (benchmarks/device_check.sh)")
def test_real_nccl_equals_torch_and_captured_replay_equals_eager(tmp_path):
    from rank_helpers import spawn_ranks

    spawn_ranks(_real_rank_main, 2, (str(tmp_path),), timeout_s=300)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["eager_equals_torch"] and result["rows_equal_torch"], result
        assert result["replay_equals_eager"] == [True] * 3, result
