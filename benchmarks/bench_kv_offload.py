"""The host KV tier on this machine: what copying a block back costs, and write-on-evict
against write-through.

1. Copy-back cost per block: `HostKVPool` loads --blocks scattered host blocks into scattered
   device blocks (the worker's real copy path; on a CPU both pools are host memory) for the
   per-rank KV layout of the `mini` preset and of the real ERNIE-4.5-21B-A3B (28 layers, 4 kv
   heads of 128, bfloat16, W = 1). Baseline in the same run: one contiguous copy of the same
   bytes (`Tensor.copy_`), i.e. what memory bandwidth allows.
2. Policy: the `mini` model serves --sessions conversations round-robin with a host tier that
   holds them all, once writing blocks to the host on eviction and once writing every block
   through as soon as it is published; on a device pool the sessions overflow (every return
   is a host hit) and on one that holds them (no eviction at all). Prints blocks and bytes
   written, host-tier hits and the wall time of each (interleaved ABBA).

Run: `.venv/bin/python benchmarks/bench_kv_offload.py [--blocks 512] [--sessions 4]`
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from common import (
    BackgroundLoad,
    add_threads_arg,
    checkpoint,
    code_version,
    machine_summary,
    median,
    set_threads,
)

from ernie_cluster.worker.kv_offload import HostKVPool

# (layers, kv heads per rank, head_dim, dtype) of one rank's KV cache.
LAYOUTS = {
    "mini": (6, 4, 32, torch.float32),
    "ERNIE-4.5-21B-A3B bf16": (28, 4, 128, torch.bfloat16),
}
BLOCK_SIZE = 16


def time_copy_back(layout, num_blocks: int, repeats: int) -> tuple[float, float, int]:
    """(seconds per block through HostKVPool, seconds per block of a contiguous copy, bytes
    per block), medians over `repeats`."""
    layers, heads, dim, dtype = layout
    pool_blocks = 2 * num_blocks
    caches = [
        torch.zeros(2, pool_blocks * BLOCK_SIZE, heads, dim, dtype=dtype) for _ in range(layers)
    ]
    pool = HostKVPool(caches, BLOCK_SIZE, num_host_blocks=pool_blocks)
    for host in pool.host_blocks:
        host.normal_()
    rng = random.Random(0)
    loads = list(
        zip(
            rng.sample(range(pool_blocks), num_blocks),
            rng.sample(range(pool_blocks), num_blocks),
            strict=True,
        )
    )
    flat_src = torch.randn(pool.block_bytes * num_blocks // dtype.itemsize).to(dtype)
    flat_dst = torch.empty_like(flat_src)
    tier, plain = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        pool.execute([], loads)
        tier.append((time.perf_counter() - start) / num_blocks)
        start = time.perf_counter()
        flat_dst.copy_(flat_src)
        plain.append((time.perf_counter() - start) / num_blocks)
    return median(tier), median(plain), pool.block_bytes


def run_policy(model: str, write_through: bool, device_blocks: int, args) -> dict:
    from ernie_cluster import LLM, SamplingParams

    rng = random.Random(1)
    histories = [
        [rng.randrange(3, 32000) for _ in range(args.session_tokens)] for _ in range(args.sessions)
    ]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(
        model=model,
        dtype="float32",
        show_progress=False,
        num_kv_blocks=device_blocks,
        num_host_kv_blocks=args.host_blocks,
        max_model_len=args.session_tokens + args.turns * 64 + 64,
    ) as llm:
        llm.engine.kv_cache.write_through = write_through
        start = time.perf_counter()
        for _turn in range(args.turns):
            for history in histories:
                out = llm.generate([history], params)[0].outputs[0]
                history += out.token_ids + [rng.randrange(3, 32000) for _ in range(48)]
        wall = time.perf_counter() - start
        stats = llm.get_stats()
    return {
        "wall_s": wall,
        "saved": stats.host_kv_blocks_saved,
        "loaded": stats.host_kv_blocks_loaded,
        "bytes": stats.host_kv_bytes_moved,
        "hit_tokens": stats.host_kv_hit_tokens,
        "computed": stats.num_prompt_tokens_computed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=512, help="blocks per timed copy-back")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--session-tokens", type=int, default=1024)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument(
        "--device-blocks",
        type=int,
        nargs=2,
        default=[160, 512],
        help="device pools: one the sessions overflow, one that holds them",
    )
    parser.add_argument("--host-blocks", type=int, default=2048, help="the host tier")
    parser.add_argument("--no-policy", action="store_true", help="skip the policy runs")
    add_threads_arg(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine_summary())
    print(code_version())

    print(f"\ncopy back {args.blocks} scattered blocks of {BLOCK_SIZE} tokens (one rank):")
    with BackgroundLoad() as load:
        for name, layout in LAYOUTS.items():
            tier, plain, size = time_copy_back(layout, args.blocks, args.repeats)
            print(
                f"  {name:24s} {size / 1024:8.1f} KiB/block: {tier * 1e6:8.1f} us/block "
                f"({size / tier / 1e9:5.2f} GB/s); contiguous copy of the same bytes "
                f"{plain * 1e6:7.1f} us/block: {tier / plain:4.2f}x"
            )
    print(f"  {load.describe()}")
    if args.no_policy:
        return

    model = str(checkpoint("mini"))
    for device_blocks in args.device_blocks:
        print(
            f"\nwrite-on-evict vs write-through: mini, {args.sessions} sessions of "
            f"{args.session_tokens} tokens x {args.turns} turns, {device_blocks} device / "
            f"{args.host_blocks} host blocks"
        )
        results: dict[bool, list[dict]] = {False: [], True: []}
        with BackgroundLoad() as load:
            for write_through in (False, True, True, False):  # ABBA
                results[write_through].append(run_policy(model, write_through, device_blocks, args))
        for write_through, runs in results.items():
            name = "write-through" if write_through else "write-on-evict"
            first = runs[0]
            print(
                f"  {name:15s} wall {median([r['wall_s'] for r in runs]):6.2f} s; blocks saved "
                f"{first['saved']}, loaded {first['loaded']}, {first['bytes'] / 2**20:7.1f} MiB "
                f"moved; host hits {first['hit_tokens']} tokens, prompt tokens computed "
                f"{first['computed']}"
            )
        evict = median([r["wall_s"] for r in results[False]])
        through = median([r["wall_s"] for r in results[True]])
        print(f"  write-through / write-on-evict wall time: {through / evict:.2f}x")
        print(f"  {load.describe()}")


if __name__ == "__main__":
    main()
