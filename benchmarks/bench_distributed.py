"""Distributed execution: control overhead per step and decode throughput at W = 1 and 2.

    .venv/bin/python benchmarks/bench_distributed.py [--skip-decode] [--threads 1]

1. Control overhead: the Ray executor with stub workers (no model: execute_model returns at
   once) at W = 2, one SchedulerOutput of 32 running requests per step; our socket step
   channel against plain Ray actor calls (every rank called, all results awaited) to the same
   actors, in the same run.
2. Decode throughput of `mini` (float32) at W = 1 (in-process) and W = 2 (two Ray actors,
   gloo): 16 requests x 64 greedy tokens; output tokens/s and the bytes each rank sends per
   step by collective (all-gather, reduce-scatter, all-to-all). On a 2-core machine W = 2
   shares the two cores, so it is expected to be slower: the figure is the cost of the
   communication, reported as measured.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
from common import add_threads_arg, checkpoint, code_version, machine_summary, set_threads

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.executor.ray_executor import RayExecutor, RayWorkerBase
from ernie_cluster.step_io import (
    CachedRequestData,
    ModelRunnerOutput,
    SchedulerOutput,
)


class StubWorker(RayWorkerBase):
    """A shard worker without a model: the step costs only the control path."""

    def start(self, init_method: str, num_threads: int) -> int:
        return 1024

    def execute_model(self, scheduler_output):
        if self.rank != 0:
            return None
        return ModelRunnerOutput(
            sampled_token_ids={r: [1] for r in scheduler_output.num_scheduled_tokens}
        )


def timed(fn, steps: int) -> list[float]:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def describe(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"p50 {statistics.median(ordered) * 1e6:7.0f} us  p99 {p99 * 1e6:7.0f} us"


def control_overhead(steps: int) -> None:
    config = EngineConfig(model="stub", tensor_parallel_size=2, expert_parallel_size=2)
    executor = RayExecutor(config, "stub", worker_cls=StubWorker)
    step = SchedulerOutput(
        cached_requests=[CachedRequestData(f"r{i}", [], 100 + i) for i in range(32)],
        num_scheduled_tokens={f"r{i}": 1 for i in range(32)},
    )
    ours = timed(lambda: executor.execute_model(step), steps)
    plain = timed(lambda: ray.get([w.execute_model.remote(step) for w in executor.workers]), steps)
    executor.shutdown()
    ratio = statistics.median(plain) / statistics.median(ours)
    print("control overhead per step, W = 2, stub workers, 32 running requests:")
    print(f"  step channel (ours):  {describe(ours)}")
    print(f"  plain Ray actor calls: {describe(plain)}")
    print(f"  ours is {ratio:.1f}x faster (p50); target < 1000 us")


def decode_throughput(threads: int, num_requests: int, max_tokens: int) -> None:
    from ernie_cluster import LLM, SamplingParams

    path = checkpoint("mini")
    prompts = [[3 + (i * 131 + j * 7) % 31000 for j in range(32)] for i in range(num_requests)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    results = {}
    for world in (1, 2):
        llm = LLM(
            model=str(path),
            dtype="float32",
            show_progress=False,
            tensor_parallel_size=world,
            expert_parallel_size=world,
            enable_prefix_caching=False,
        )
        executor = llm.engine.executor
        if world == 1:
            import torch

            torch.set_num_threads(threads)
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4))
        before = executor.collective_rpc("communication_bytes")
        steps_before = llm.engine.scheduler.stats.num_scheduled_tokens
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        after = executor.collective_rpc("communication_bytes")
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        computed = llm.engine.scheduler.stats.num_scheduled_tokens - steps_before
        steps = max_tokens  # every request decodes together: one step per output token
        per_rank = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
        results[world] = ([o.outputs[0].token_ids for o in outputs], tokens / seconds)
        print(
            f"W = {world}: {tokens / seconds:7.1f} output tokens/s "
            f"({tokens} tokens, {computed} tokens computed, {seconds:.1f} s)"
        )
        for rank, sent in enumerate(per_rank):
            if world > 1:
                per_step = {k: v / steps for k, v in sent.items()}
                print(
                    f"  rank {rank} sends per step: "
                    + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in per_step.items())
                )
        llm.shutdown()
    same = results[1][0] == results[2][0]
    print(
        f"W = 2 / W = 1 throughput: {results[2][1] / results[1][1]:.2f}x; "
        f"greedy tokens identical: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="control-overhead steps")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    add_threads_arg(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine_summary())
    print(f"code: {code_version()}")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="ERROR",
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}},
    )
    control_overhead(args.steps)
    if not args.skip_decode:
        decode_throughput(args.threads, args.num_requests, args.max_tokens)
    ray.shutdown()


if __name__ == "__main__":
    main()
