"""Graph replay equals eager, on CPU under a faked torch.cuda graph API (tests/
fake_cuda_graphs: replay re-runs the captured ops on the static buffers, Python does not run):
whole decode-step graphs (DecodeGraphs) and piecewise graphs of prefill, mixed and decode steps
(PiecewiseGraphs), at W = 1 and over gloo at W = 2: the same greedy tokens, logprobs within
1e-5, the same expert counters, every step of the kind replayed rather than run eagerly.
With a GPU (benchmarks/device_check.sh) the same comparisons run on real CUDA graphs with the
Triton backend, and at W = 2 over NCCL when two GPUs are present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import runner_helpers
import torch
from fake_cuda_graphs import FakeCUDAGraph, fake_cuda_graph_api

from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.worker.model_runner import ModelRunner
from ernie_cluster.worker.step_script import mixed_script

PARAMS = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, logprobs=2)
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
TOLERANCE = 1e-5  # on CPU; real kernels at other batch shapes may round differently


def make_runner(checkpoint, rank: int = 0, world: int = 1, device: str = "cpu") -> ModelRunner:
    return runner_helpers.make_runner(
        checkpoint, rank, world, device, max_num_seqs=4, max_num_batched_tokens=32
    )


def run_steps(runner: ModelRunner) -> dict:
    script, steps = mixed_script()
    script.params = PARAMS
    logprobs = []
    for scheduled in steps:
        out = runner.execute_model(script.step(scheduled))
        script.record(out)
        logprobs.append({r: {str(t): v for t, v in e[0].items()} for r, e in out.logprobs.items()})
    return {
        "tokens": script.sampled,
        "logprobs": logprobs,
        "load": runner.model.expert_load().tolist(),
        "kinds": ["decode" if set(s.values()) == {1} else "mixed" for s in steps],
    }


def capture(runner: ModelRunner, whole_decode: bool) -> list:
    """Capture under the fake API; returns the fake graphs (their replay counts)."""
    from ernie_cluster.worker.cuda_graphs import DecodeGraphs
    from ernie_cluster_tools.diagnostics import use_sync_free_experts

    use_sync_free_experts(runner.model)  # CUDA's MoE path; the CPU default reads counts
    with fake_cuda_graph_api() as made:
        if whole_decode:
            runner.cuda_graphs = DecodeGraphs.capture(runner)
        else:
            runner.capture_graphs()
    assert made and not any(g.replays for g in made)
    return made


def assert_same(graphs: dict, eager: dict, tolerance: float = TOLERANCE) -> None:
    assert graphs["tokens"] == eager["tokens"]
    assert graphs["load"] == eager["load"]
    for step, (got, want) in enumerate(zip(graphs["logprobs"], eager["logprobs"], strict=True)):
        assert got.keys() == want.keys(), step
        for req_id, entry in want.items():
            assert got[req_id].keys() == entry.keys(), (step, req_id)
            for token, value in entry.items():
                assert got[req_id][token] == pytest.approx(value, abs=tolerance), (step, req_id)


def test_decode_graphs_replay_equals_eager(tiny_checkpoint):
    eager = run_steps(make_runner(tiny_checkpoint))
    runner = make_runner(tiny_checkpoint)
    made = capture(runner, whole_decode=True)
    with fake_cuda_graph_api():
        graphs = run_steps(runner)
    assert_same(graphs, eager)
    # one decode graph replay per decode step; steps with a prompt ran eagerly
    assert sum(g.replays for g in made) == graphs["kinds"].count("decode")


def test_piecewise_graphs_replay_equals_eager(tiny_checkpoint):
    eager = run_steps(make_runner(tiny_checkpoint))
    runner = make_runner(tiny_checkpoint)
    made = capture(runner, whole_decode=False)
    assert runner.cuda_graphs is None  # the torch backend is not whole-step graph-safe
    pieces = len(runner.model.layers) + 1
    assert len(made) == pieces * len(runner.piecewise_graphs.buckets)
    with fake_cuda_graph_api():
        graphs = run_steps(runner)
    assert_same(graphs, eager)
    # every step, prefill and mixed included, replayed all of its bucket's pieces
    assert sum(g.replays for g in made) == pieces * len(graphs["kinds"])


def test_replay_does_not_rerun_python(tiny_checkpoint):
    """The harness is a graph: a host value changed after capture is not seen on replay."""
    x = torch.ones(3)
    scale = [2.0]
    graph = FakeCUDAGraph()
    graph.capture_begin()
    y = x * scale[0]
    graph.capture_end()
    x.fill_(5.0)
    scale[0] = 100.0
    graph.replay()
    assert y.tolist() == [10.0, 10.0, 10.0]
    graph = FakeCUDAGraph()
    graph.capture_begin()
    with pytest.raises(RuntimeError):
        x.sum().item()
        graph.capture_end()


@pytest.mark.skipif(not GPUS, reason="needs a GPU (benchmarks/device_check.sh)")
def test_real_graphs_replay_equals_eager_on_cuda(tiny_checkpoint):
    eager = run_steps(make_runner(tiny_checkpoint, device="cuda"))
    runner = make_runner(tiny_checkpoint, device="cuda")
    runner.capture_graphs()  # Triton attention: whole decode graphs, then the pieces
    assert runner.cuda_graphs is not None and runner.piecewise_graphs.graphs
    assert_same(run_steps(runner), eager, tolerance=1e-4)


# ------------------------------------------------------- W = 2 over gloo (or NCCL on 2 GPUs)


def _rank_main(rank: int, world: int, port: int, checkpoint: str, out_dir: str, cuda: bool) -> None:
    import torch.distributed as dist

    if cuda:
        from ernie_cluster.distributed.process_group import init_distributed

        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
        init_distributed(rank, world, f"tcp://127.0.0.1:{port}", torch.device(device))
    else:
        from rank_helpers import init_gloo

        device = "cpu"
        init_gloo(rank, world, port)
    result = {}
    try:
        result["eager"] = run_steps(make_runner(checkpoint, rank, world, device))
        runner = make_runner(checkpoint, rank, world, device)
        if cuda:  # real graphs: whole decode steps and pieces, NCCL collectives captured
            runner.capture_graphs()
            result["graphs"] = run_steps(runner)
        else:
            made = capture(runner, whole_decode=False)
            with fake_cuda_graph_api():
                result["graphs"] = run_steps(runner)
            result["replays"] = sum(g.replays for g in made)
        result["pieces"] = len(runner.model.layers) + 1
        dist.barrier()
    finally:
        dist.destroy_process_group()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


def _replay_at_w2(tmp_path, tmp_path_factory, cuda: bool) -> None:
    from rank_helpers import spawn_ranks

    from ernie_cluster_tools.fixtures.make_tiny import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("w2"), preset="tiny", seed=5)
    spawn_ranks(_rank_main, 2, (str(checkpoint), str(tmp_path), cuda), timeout_s=400)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert_same(result["graphs"], result["eager"], tolerance=1e-4 if cuda else TOLERANCE)
        if not cuda:
            assert result["replays"] == result["pieces"] * len(result["graphs"]["kinds"])
    assert ranks[0]["graphs"]["tokens"] == ranks[1]["graphs"]["tokens"]


@pytest.mark.slow
def test_piecewise_graphs_replay_equals_eager_at_w2(tmp_path, tmp_path_factory):
    _replay_at_w2(tmp_path, tmp_path_factory, cuda=False)


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs (benchmarks/device_check.sh)")
def test_real_graphs_replay_equals_eager_at_w2_over_nccl(tmp_path, tmp_path_factory):
    """The first W = 2 capture/replay: until it has passed on a device, --enforce-eager is
    the default at W > 1 on CUDA."""
    _replay_at_w2(tmp_path, tmp_path_factory, cuda=True)
