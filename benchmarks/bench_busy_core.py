"""Our offline rate with one core held busy by another process, against the quiet machine.

The same workload as `bench_vllm_cpu.py --offline` (mini with zeroed router correction
biases, token-id prompts of --min-prompt..--max-prompt random tokens, --output-len greedy
tokens each, ignore_eos), one `LLM.generate` call per timed run, at --threads torch threads.
Runs alternate quiet / busy in ABBA order; during a busy run a child process spins on one
core (a pure-Python loop, pinned to --busy-cpu where the OS allows it). Prints both medians
and busy/quiet; the issue-25 goal is >= 0.80.

    .venv/bin/python benchmarks/bench_busy_core.py --threads 1
    .venv/bin/python benchmarks/bench_busy_core.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from contextlib import contextmanager

from bench_vllm_cpu import zero_bias_checkpoint
from common import checkpoint, code_version, machine_summary, median, random_prompt, spread

SPIN = "import os, sys\nif hasattr(os, 'sched_setaffinity'): os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass\n"


@contextmanager
def busy_core(cpu: int):
    """A child process spinning on core `cpu` for the duration of the block."""
    spinner = subprocess.Popen([sys.executable, "-c", SPIN, str(cpu)])
    try:
        time.sleep(0.5)  # let it start spinning
        yield
    finally:
        spinner.kill()
        spinner.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="our torch threads")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--busy-cpu", type=int, default=0, help="the core the spinner holds")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--min-prompt", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (ABBA)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from ernie_cluster import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    model = zero_bias_checkpoint(checkpoint("mini", args.seed))
    llm = LLM(
        model=str(model),
        dtype=args.dtype,
        max_model_len=1024,
        max_num_seqs=32,
        max_num_batched_tokens=2048,
        kv_cache_memory_bytes=1 << 30,
        seed=args.seed,
        show_progress=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    rng = random.Random(f"{args.seed}-busy")

    def prompts() -> list[list[int]]:
        return [
            random_prompt(rng, rng.randint(args.min_prompt, args.max_prompt), 32000)
            for _ in range(args.num_prompts)
        ]

    def timed() -> float:
        batch = prompts()  # fresh prompts: no prefix-cache hits between runs
        start = time.perf_counter()
        llm.generate(batch, params)
        return args.num_prompts * args.output_len / (time.perf_counter() - start)

    llm.generate(prompts()[:4], params)  # warm-up
    rates: dict[str, list[float]] = {"quiet": [], "busy": []}
    for rep in range(args.repeats):
        for side in ("quiet", "busy") if rep % 2 == 0 else ("busy", "quiet"):
            if side == "busy":
                with busy_core(args.busy_cpu):
                    rates[side].append(timed())
            else:
                rates[side].append(timed())
    print(f"machine: {machine_summary()}; cores {os.cpu_count()}")
    print(f"code: {code_version()}")
    print(
        f"{args.dtype}, {args.threads} thread(s), {args.num_prompts} prompts of "
        f"{args.min_prompt}..{args.max_prompt} tokens x {args.output_len}, ABBA x{args.repeats}"
    )
    for side, values in rates.items():
        print(f"  {side:5s} {median(values):7.1f} output tokens/s  (spread {spread(values)})")
    print(f"  busy/quiet: {median(rates['busy']) / median(rates['quiet']):.2f}")


if __name__ == "__main__":
    main()
