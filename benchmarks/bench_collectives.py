"""Collectives and bytes per decode step at W = 2 and 4, measured on CPU over gloo: the
token-sharded all-to-all layout (before) against the replicated all-reduce layout the engine
now picks at decode sizes (after), on the `mini` preset (float32, 6 layers, 64 experts, top-6).

Each rank loads its shard, prefills --batch prompts in one step, then runs --steps decode
steps under distributed/census (every c10d op counted by a dispatch mode, per decoder layer;
bytes from the communicator: all-gather, reduce-scatter, all-to-all as sent on the wire with
its fixed-capacity padding, all-reduce as a ring sends it). The logits gather and the sampled
tokens' broadcast are counted as collectives; their bytes (the same in both layouts) are not.
Greedy tokens of the two layouts are compared. Counts, not times: the ratio printed is
collectives after / before.

Run: `.venv/bin/python benchmarks/bench_collectives.py [--batch 8] [--worlds 2,4]`
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch.multiprocessing as mp
from common import checkpoint

LAYOUTS = ("sharded", "auto")
WIRE = ("all_gather", "reduce_scatter", "all_to_all_padded", "all_reduce")


def rank_main(rank: int, world: int, port: int, ckpt: str, batch: int, steps: int, out: str):
    import datetime

    import torch
    import torch.distributed as dist

    from ernie_cluster.config.engine_config import EngineConfig
    from ernie_cluster.distributed.communicator import Communicator
    from ernie_cluster.loader.model_loader import load_model
    from ernie_cluster.model.sharding import ShardSpec
    from ernie_cluster.worker.model_runner import ModelRunner
    from ernie_cluster.worker.step_script import StepScript, prompt
    from ernie_cluster_tools.census import census_step

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )
    comm = Communicator(rank, world)
    model = load_model(
        ckpt, dtype="float32", shard=ShardSpec(rank, world), show_progress=False, comm=comm
    )
    config = EngineConfig(
        model=ckpt,
        dtype="float32",
        tensor_parallel_size=world,
        expert_parallel_size=world,
        max_model_len=256,
        max_num_seqs=batch,
        block_size=4,
        show_progress=False,
    )
    result = {}
    for layout in LAYOUTS:
        runner = ModelRunner(model, num_blocks=16 * batch + 16, config=config, device="cpu")
        model.collective_layout = layout
        script = StepScript()
        names = [f"r{i}" for i in range(batch)]
        for i, name in enumerate(names):
            script.add(name, prompt(i, 16 + i, model.config.vocab_size))
        script.record(runner.execute_model(script.step({n: 16 + i for i, n in enumerate(names)})))
        census = []
        for _ in range(steps):
            out_step, counted = census_step(runner, script.step(script.decodes(names)))
            script.record(out_step)
            census.append(counted)
        result[layout] = {
            "collectives": [c.total for c in census],
            "max_per_layer": max(max(c.per_layer) for c in census),
            "per_layer": census[0].per_layer,
            "bytes": {k: sum(c.bytes_sent.get(k, 0) for c in census) / steps for k in WIRE},
            "tokens": script.sampled,
            "syncs": sum(len(c.syncs) for c in census),
        }
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def main() -> None:
    from ernie_cluster.distributed.process_group import free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences per decode step")
    parser.add_argument("--steps", type=int, default=3, help="counted decode steps")
    parser.add_argument("--worlds", default="2,4", help="world sizes")
    parser.add_argument("--preset", default="mini")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ckpt = str(checkpoint(args.preset))
    print(f"{args.preset}, decode batch {args.batch}, {args.steps} steps, gloo on CPU")
    print(
        f"{'W':>2} {'layout':<10} {'colls/step':>10} {'max/layer':>9} {'KB/step/rank':>12}  "
        "by collective (KB)"
    )
    for world in [int(w) for w in args.worlds.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rank0.json"
            start = time.perf_counter()
            mp.start_processes(
                rank_main,
                args=(world, free_port(), ckpt, args.batch, args.steps, str(out)),
                nprocs=world,
                start_method="spawn",
            )
            result = json.loads(out.read_text())
        counts = {}
        for layout in LAYOUTS:
            r = result[layout]
            counts[layout] = sum(r["collectives"]) / len(r["collectives"])
            total = sum(r["bytes"].values()) / 1e3
            parts = ", ".join(f"{k} {v / 1e3:.1f}" for k, v in r["bytes"].items() if v)
            label = "replicated" if layout == "auto" else layout
            print(
                f"{world:>2} {label:<10} {counts[layout]:>10.0f} {r['max_per_layer']:>9} "
                f"{total:>12.1f}  {parts}"
            )
        same = result["auto"]["tokens"] == result["sharded"]["tokens"]
        print(
            f"   after / before collectives: {counts['auto'] / counts['sharded']:.2f}; "
            f"greedy tokens identical: {same}; ({time.perf_counter() - start:.0f} s)"
        )


if __name__ == "__main__":
    main()
