"""Scheduler overhead per decode step: `Scheduler.schedule()` + `update_from_output()`.

--num-requests requests with random --prompt-len token prompts run against a stub model (no
model: sampled token ids are made up), with the engine's KVCacheManager (block size 16,
prefix caching on, as the engine defaults). All requests first get past prefill; then
--steps steady-state decode steps are timed one by one (the stub's token fabrication is not
timed). Prints mean, p50 and p99 microseconds per step against the issue's 1 ms target.

The peer measured in the same run is one decode step of the `mini` model at the same batch
and at the middle context of the timed steps (AttentionMetadata + forward + logits + argmax
over a zero-filled paged KV cache, whose values do not change the cost), so the scheduler's
share of a step is visible.
Skip it with --no-model.

Run: `.venv/bin/python benchmarks/bench_scheduler.py [--prompt-len 1024] [--no-model]`
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from common import (
    BackgroundLoad,
    add_threads_arg,
    checkpoint,
    code_version,
    greedy_step,
    machine_summary,
    median,
    random_prompt,
    set_threads,
)

from ernie_cluster.engine.kv_cache import KVCacheManager
from ernie_cluster.engine.request import Request
from ernie_cluster.engine.scheduler import Scheduler, SchedulerConfig
from ernie_cluster.sampling_params import SamplingParams

BLOCK_SIZE = 16
VOCAB_SIZE = 32000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1000, help="decode steps timed")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--no-model", action="store_true", help="skip the model-step peer")
    parser.add_argument("--model-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    add_threads_arg(parser)
    return parser.parse_args()


def make_scheduler(args: argparse.Namespace) -> Scheduler:
    # NOTE: the first requests admitted start decoding while the last are still in prefill,
    # so they run ahead by up to the number of prefill steps (bounded generously here).
    prefill_steps = 2 * -(-args.num_requests * args.prompt_len // args.max_num_batched_tokens)
    max_len = args.prompt_len + prefill_steps + 16 + args.warmup_steps + args.steps
    num_blocks = args.num_requests * -(-max_len // BLOCK_SIZE)
    kv_cache = KVCacheManager(num_blocks, BLOCK_SIZE, not args.no_prefix_caching)
    config = SchedulerConfig(
        max_num_seqs=args.num_requests,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max_len,
    )
    scheduler = Scheduler(config, kv_cache)
    rng = random.Random(args.seed)
    # As LLMEngine.add_request builds them for greedy, ignore_eos, n=1 requests.
    params = SamplingParams(temperature=0.0, max_tokens=max_len - args.prompt_len, ignore_eos=True)
    for i in range(args.num_requests):
        scheduler.add_request(
            Request(
                request_id=f"req-{i}",
                prompt_token_ids=random_prompt(rng, args.prompt_len, VOCAB_SIZE),
                params=params,
                stop_token_ids=frozenset(),
                max_tokens=params.max_tokens,
                parent_id=f"req-{i}",
                arrival_seq=i,
            )
        )
    return scheduler


def stub_step(scheduler: Scheduler, rng: random.Random) -> tuple[int, int, int]:
    """One step with made-up tokens: (ns in schedule, ns in update_from_output, tokens)."""
    start = time.perf_counter_ns()
    out = scheduler.schedule()
    scheduled = time.perf_counter_ns()
    sampled = {}
    for req_id in out.num_scheduled_tokens:
        request = scheduler.requests[req_id]
        if request.num_computed_tokens == request.num_tokens:  # reached its end: samples
            sampled[req_id] = rng.randrange(VOCAB_SIZE)
    before_update = time.perf_counter_ns()
    scheduler.update_from_output(out, sampled)
    end = time.perf_counter_ns()
    return scheduled - start, end - before_update, out.total_num_scheduled_tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def model_step_seconds(args: argparse.Namespace, context: int) -> tuple[float, float]:
    """Median seconds of one mini decode step at this batch and context, and of its metadata."""
    from ernie_cluster.loader.model_loader import load_model
    from ernie_cluster.worker.model_runner import allocate_kv_caches

    model = load_model(checkpoint("mini", 0), dtype="float32", show_progress=False)
    per_seq = -(-context // BLOCK_SIZE)
    model.bind_kv_caches(allocate_kv_caches(model, args.num_requests * per_seq, BLOCK_SIZE, "cpu"))
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(args.num_requests)]
    batch = args.num_requests
    tokens = torch.randint(3, VOCAB_SIZE, (batch,)).tolist()
    step_seconds, meta_seconds = [], []
    for rep in range(args.model_repeats + 1):
        start = time.perf_counter()
        tokens, meta = greedy_step(
            model, tokens, [1] * batch, [context] * batch, tables, BLOCK_SIZE
        )
        if rep:  # the first is the warm-up
            step_seconds.append(time.perf_counter() - start)
            meta_seconds.append(meta)
    return median(step_seconds), median(meta_seconds)


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    scheduler = make_scheduler(args)
    rng = random.Random(args.seed + 1)
    print(f"machine: {machine_summary()}")
    print(f"code: {code_version()}")
    print(
        f"{args.num_requests} requests x {args.prompt_len}-token prompts, "
        f"max_num_batched_tokens={args.max_num_batched_tokens}, block size {BLOCK_SIZE}, "
        f"prefix caching {'off' if args.no_prefix_caching else 'on'}"
    )

    num_prefill_steps = 0
    while any(r.num_output_tokens == 0 for r in scheduler.requests.values()):
        stub_step(scheduler, rng)
        num_prefill_steps += 1
    for _ in range(args.warmup_steps):
        stub_step(scheduler, rng)

    schedule_us, update_us = [], []
    with BackgroundLoad() as load:
        for _ in range(args.steps):
            schedule_ns, update_ns, num_tokens = stub_step(scheduler, rng)
            if num_tokens != args.num_requests:
                raise RuntimeError(
                    f"a decode step scheduled {num_tokens} tokens, expected one each"
                )
            schedule_us.append(schedule_ns / 1e3)
            update_us.append(update_ns / 1e3)
    total_us = [s + u for s, u in zip(schedule_us, update_us, strict=True)]
    context = args.prompt_len + args.warmup_steps + 1
    print(
        f"prefill took {num_prefill_steps} steps; timed {args.steps} decode steps "
        f"(context {context}..{context + args.steps - 1} tokens)"
    )
    print(
        f"  schedule + update_from_output: mean {statistics.fmean(total_us):.0f} us, "
        f"p50 {percentile(total_us, 50):.0f} us, p99 {percentile(total_us, 99):.0f} us "
        f"({statistics.fmean(total_us) / 1e3:.2f}x the 1 ms target; "
        f"{statistics.fmean(total_us) / args.num_requests:.1f} us per request)"
    )
    print(
        f"    schedule():           mean {statistics.fmean(schedule_us):.0f} us, "
        f"p99 {percentile(schedule_us, 99):.0f} us"
    )
    print(
        f"    update_from_output(): mean {statistics.fmean(update_us):.0f} us, "
        f"p99 {percentile(update_us, 99):.0f} us"
    )
    tenth = max(1, args.steps // 10)
    print(
        f"    first {tenth} steps (context ~{context}): mean "
        f"{statistics.fmean(total_us[:tenth]):.0f} us; last {tenth} "
        f"(context ~{context + args.steps - 1}): {statistics.fmean(total_us[-tenth:]):.0f} us"
    )
    print(f"  {load.describe()}")

    if not args.no_model:
        middle = context + args.steps // 2
        step, meta = model_step_seconds(args, middle)
        print(
            f"peer: mini decode step at batch {args.num_requests}, context {middle}: "
            f"{step * 1e3:.1f} ms (of which AttentionMetadata.build {meta * 1e3:.1f} ms)"
        )
        ratio = statistics.fmean(total_us) / 1e6 / step
        print(f"  ratio scheduler / model step: {ratio:.4f} ({100 * ratio:.2f}% of the step)")


if __name__ == "__main__":
    main()
