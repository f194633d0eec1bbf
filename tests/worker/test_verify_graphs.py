"""Speculative verify steps replay the whole-step decode graphs, as one decode row per query
token (worker/decode_rows), under the faked graph API (tests/fake_cuda_graphs) with Triton
attention in the CPU interpreter: a decode + verify step's hidden rows, logits and tokens equal
the eager forward's (whose verifies run the prefill kernel), a greedy ngram run gives the same
tokens and logprobs with and without graphs, and a step with a prefill chunk stays off the
decode graphs. With a GPU, the first comparison runs on real CUDA graphs and Triton instead
(not yet run on one)."""

from __future__ import annotations

import contextlib
import os

import torch

# NOTE: before any Triton kernel module is imported (see tests/attention/test_triton_attention).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import runner_helpers
from fake_cuda_graphs import fake_cuda_graph_api

from ernie_cluster import LLM, SamplingParams
from ernie_cluster.step_io import SchedulerOutput
from ernie_cluster.worker.decode_rows import is_decode_and_verify
from ernie_cluster.worker.step_script import StepScript, prompt

pytest.importorskip("triton")

TOLERANCE = 1e-5  # as tests/worker/test_cuda_graphs: float32 on CPU
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
# The interpreter runs Triton only on CPU tensors, and the stand-in records only its launches.
CPU_ONLY = pytest.mark.skipif(GPUS > 0, reason="CPU stand-in for CUDA graphs")


def capture_decode_graphs(runner) -> list:
    """Whole decode-step graphs under the fake API; returns the fake graphs."""
    from ernie_cluster.worker.cuda_graphs import DecodeGraphs
    from ernie_cluster_tools.diagnostics import use_sync_free_experts

    use_sync_free_experts(runner.model)  # CUDA's MoE path; the CPU default reads counts
    with fake_cuda_graph_api() as made:
        runner.cuda_graphs = DecodeGraphs.capture(runner)
    assert made and not any(g.replays for g in made)
    return made


def gpu_path_runner(checkpoint):
    """A runner on the GPU path (Triton attention, norms, RoPE; sync-free experts)."""
    from ernie_cluster_tools.diagnostics import use_sync_free_experts
    from ernie_cluster_tools.kernel_counter import use_gpu_path

    runner = runner_helpers.make_runner(checkpoint, max_num_seqs=10, max_num_batched_tokens=32)
    use_gpu_path(runner.model)
    use_sync_free_experts(runner.model)
    return runner


class Spy:
    """Records each step's sampled hidden rows and logits, and the model's eager forwards."""

    def __init__(self, runner) -> None:
        self.rows: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.forwards = 0
        model = runner.model
        compute_logits, forward = model.compute_logits, model.forward

        def spy_logits(hidden, rows):
            logits = compute_logits(hidden, rows)
            self.rows.append(hidden.index_select(0, rows).clone())
            self.logits.append(logits.clone())
            return logits

        def spy_forward(*args, **kwargs):
            self.forwards += 1
            return forward(*args, **kwargs)

        model.compute_logits, model.forward = spy_logits, spy_forward


def script_steps() -> tuple[StepScript, list[SchedulerOutput]]:
    """Three prompts; then a step of a plain decode (c) and two verifies of 3 proposals (a, b),
    9 query tokens; then a verify of c beside a fresh prompt (d), a step with a prefill."""
    script = StepScript()
    for i, (name, length) in enumerate([("a", 6), ("b", 5), ("c", 7), ("d", 4)]):
        script.add(name, prompt(i + 1, length))
    first = script.step({"a": 6, "b": 5, "c": 7})
    verify = script.step({"c": 1, "a": 4, "b": 4})
    verify.spec_token_ids = {"a": [11, 12, 13], "b": prompt(2, 3)}
    mixed = script.step({"c": 3, "d": 4})
    mixed.spec_token_ids = {"c": [21, 22]}
    return script, [first, verify, mixed]


def run_script(runner, spy: Spy, made: list | None = None) -> tuple[list, list[int]]:
    """Each step's sampled tokens, and each step's decode-graph replays (none when eager)."""
    _, steps = script_steps()
    tokens, replays = [], []
    on_cuda = runner.device.type == "cuda"
    for out in steps:
        before = sum(g.replays for g in made or ())
        with contextlib.nullcontext() if on_cuda else fake_cuda_graph_api():
            tokens.append(runner.execute_model(out).sampled_token_ids)
        replays.append(sum(g.replays for g in made or ()) - before)
    return tokens, replays


@CPU_ONLY
def test_verify_step_replays_the_decode_graph_and_equals_eager(tiny_checkpoint):
    eager_runner = gpu_path_runner(tiny_checkpoint)
    eager = Spy(eager_runner)
    want_tokens, _ = run_script(eager_runner, eager)
    runner = gpu_path_runner(tiny_checkpoint)
    made = capture_decode_graphs(runner)
    graphs = Spy(runner)
    got_tokens, replays = run_script(runner, graphs, made)
    _, steps = script_steps()
    assert [is_decode_and_verify(out) for out in steps] == [False, True, False]
    # the verify step (9 tokens: bucket 10) replayed its graph and ran nothing eagerly; the
    # prompt step and the step with a prefill chunk ran eagerly
    assert replays == [0, 1, 0]
    assert graphs.forwards == eager.forwards - 1 == 2
    assert got_tokens == want_tokens
    assert [len(rows) for rows in graphs.rows] == [3, 9, 4]
    for got, want in zip(graphs.rows + graphs.logits, eager.rows + eager.logits, strict=True):
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)


@CPU_ONLY
@pytest.mark.slow  # two engines and a capture in the interpreter: about 70 s on 2 cores
def test_greedy_ngram_run_with_decode_graphs_equals_the_run_without(tiny_checkpoint):
    prompts = [prompt(5, 9) * 3, prompt(6, 7) * 3 + prompt(6, 3)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    results = []
    for with_graphs in (False, True):
        with LLM(
            model=str(tiny_checkpoint),
            dtype="float32",
            attention_backend="triton",
            max_num_seqs=8,
            show_progress=False,
            speculative_config=spec,
        ) as llm:
            runner = llm.engine.executor.worker.runner
            made = capture_decode_graphs(runner) if with_graphs else []
            steps = count_steps(runner, made)
            with fake_cuda_graph_api():
                outputs = [o.outputs[0] for o in llm.generate(prompts, params)]
            accepted = llm.get_stats().spec_decode.num_accepted_tokens
            results.append((outputs, steps, accepted))
    (plain, _, _), (graphed, steps, accepted) = results
    assert accepted > 0  # proposals were accepted, not only rejected
    assert [o.token_ids for o in graphed] == [o.token_ids for o in plain]
    for got, want in zip(graphed, plain, strict=True):
        for got_step, want_step in zip(got.logprobs, want.logprobs, strict=True):
            assert got_step.keys() == want_step.keys()
            for token, value in want_step.items():
                assert got_step[token] == pytest.approx(value, abs=TOLERANCE)
    # every step without a prefill chunk, verifies included, replayed one decode graph
    for kind, tokens, replays in steps:
        assert replays == (1 if kind != "prefill" and tokens <= 8 else 0), (kind, tokens)
    verifies = [s for s in steps if s[0] == "verify"]
    assert len(verifies) >= 3 and all(replays == 1 for _, _, replays in verifies)


@pytest.mark.skipif(not GPUS, reason="needs a GPU (not yet run on one)")
def test_real_verify_graphs_equal_eager_on_cuda(tiny_checkpoint):
    def cuda_runner():
        return runner_helpers.make_runner(
            tiny_checkpoint, device="cuda", max_num_seqs=10, max_num_batched_tokens=32
        )

    eager_runner = cuda_runner()
    eager = Spy(eager_runner)
    want_tokens, _ = run_script(eager_runner, eager)
    runner = cuda_runner()
    runner.capture_graphs()  # Triton attention: whole decode graphs, then the pieces
    replayed = []
    run = runner.cuda_graphs.run

    def spy_run(*args):
        hidden = run(*args)
        replayed.append(hidden is not None)
        return hidden

    runner.cuda_graphs.run = spy_run
    graphs = Spy(runner)
    got_tokens, _ = run_script(runner, graphs)
    assert replayed == [False, True, False]
    assert got_tokens == want_tokens
    for got, want in zip(graphs.rows + graphs.logits, eager.rows + eager.logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def count_steps(runner, made: list) -> list[tuple[str, int, int]]:
    """Wraps runner.execute_model: appends (kind, query tokens, decode-graph replays) per step,
    kind "prefill" (a prefill chunk), "verify" (decodes and verifies) or "decode"."""
    steps: list[tuple[str, int, int]] = []
    execute = runner.execute_model

    def counted(out: SchedulerOutput):
        before = sum(g.replays for g in made)
        result = execute(out)
        if out.num_scheduled_tokens:
            kind = "verify" if out.spec_token_ids else "decode"
            kind = kind if is_decode_and_verify(out) else "prefill"
            tokens = sum(out.num_scheduled_tokens.values())
            steps.append((kind, tokens, sum(g.replays for g in made) - before))
        return result

    runner.execute_model = counted
    return steps
