"""Host time of building one decode step's inputs, at batch 64 and growing contexts.

"after": the model runner's path: apply the scheduler's diff to the persistent batch
(`ModelRunner.update_states`) and pack the step's inputs for one upload (`_prepare`), over
steady decode steps in which every sequence crosses a block boundary once every block_size
steps. "before": the path as of commit 0073b80, reproduced here: Python lists of every
sequence's token ids and whole block table, then `AttentionMetadata.build`'s padded
[B, max_blocks] table, decode mask and slot mapping. Both run on CPU tensors; no model runs
(the KV cache is a 1-block stub and block ids alias it), so only host work is timed.

Run: `.venv/bin/python benchmarks/bench_step_inputs.py [--contexts 1024 32768 131072]`
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import BackgroundLoad, add_threads_arg, code_version, machine_summary, set_threads

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.step_io import (
    CachedRequestData,
    NewRequestData,
    SchedulerOutput,
)
from ernie_cluster.worker.model_runner import ModelRunner
from ernie_cluster_tools.fixtures.presets import preset_config

BLOCK_SIZE = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 32768, 131072])
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per context")
    add_threads_arg(parser)
    return parser.parse_args()


def before_step(token_ids, block_tables, context_lens) -> None:
    """Commit 0073b80's per-step input building for a batch of decodes."""
    input_ids = [tokens[-1] for tokens in token_ids]
    positions = [ctx - 1 for ctx in context_lens]
    num_seqs = len(context_lens)
    max_blocks = max(len(t) for t in block_tables)
    padded = torch.tensor(
        [list(t) + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.long
    ).reshape(num_seqs, max_blocks)
    q_lens = torch.ones(num_seqs, dtype=torch.long)
    ctx_lens = torch.as_tensor(context_lens, dtype=torch.long)
    starts = torch.cumsum(q_lens, 0) - q_lens
    rows = int(q_lens.sum())
    seq_of_row = torch.repeat_interleave(torch.arange(num_seqs), q_lens)
    pos = torch.arange(rows) - starts[seq_of_row] + (ctx_lens - q_lens)[seq_of_row]
    _ = padded[seq_of_row, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    decode_seqs = (q_lens == 1).nonzero().squeeze(-1)
    decode_blocks = -(-int(ctx_lens[decode_seqs].max()) // BLOCK_SIZE)
    _ = padded[decode_seqs][:, :decode_blocks]
    _ = torch.arange(decode_blocks * BLOCK_SIZE)[None, :] < ctx_lens[decode_seqs, None]
    torch.tensor(input_ids), torch.tensor(positions)


def time_before(batch: int, context: int, steps: int) -> list[float]:
    token_ids = [[5] * context for _ in range(batch)]
    tables = [list(range(-(-context // BLOCK_SIZE))) for _ in range(batch)]
    lens = [context] * batch
    seconds = []
    for step in range(steps):
        for i in range(batch):
            token_ids[i].append(5)
            lens[i] += 1
            if lens[i] > len(tables[i]) * BLOCK_SIZE:
                tables[i].append(0)
        start = time.perf_counter()
        before_step(token_ids, tables, lens)
        seconds.append(time.perf_counter() - start)
        del step
    return seconds


def time_after(batch: int, context: int, steps: int) -> list[float]:
    config = ErnieMoeConfig.from_dict(preset_config("tiny"))
    max_len = context + steps + BLOCK_SIZE
    engine = EngineConfig(
        model="unused", max_model_len=max_len, max_num_seqs=batch, block_size=BLOCK_SIZE
    )
    model = Ernie4_5_MoeForCausalLM(config, torch.float32)
    runner = ModelRunner(model, num_blocks=1, config=engine, device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1)
    num_blocks = -(-context // BLOCK_SIZE)
    new = [
        NewRequestData(f"r{i}", [5] * context, params, [2], 0, [0] * num_blocks, context - 1)
        for i in range(batch)
    ]
    runner.update_states(SchedulerOutput(new_requests=new))
    lens = [context] * batch
    seconds = []
    for _ in range(steps):
        cached = []
        for i in range(batch):
            grows = lens[i] + 1 > -(-lens[i] // BLOCK_SIZE) * BLOCK_SIZE
            cached.append(CachedRequestData(f"r{i}", [0] if grows else [], lens[i] - 1))
        out = SchedulerOutput(
            cached_requests=cached, num_scheduled_tokens={f"r{i}": 1 for i in range(batch)}
        )
        start = time.perf_counter()
        runner.update_states(out)
        runner._prepare(out)
        seconds.append(time.perf_counter() - start)
        for i in range(batch):  # what sampling would append
            runner.requests[f"r{i}"].token_ids.append(5)
            lens[i] += 1
    return seconds


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    print(machine_summary())
    print(f"code: {code_version()}")
    print(f"batch {args.batch} decodes, block size {BLOCK_SIZE}, {args.steps} steps timed")
    print(f"{'context':>8} {'before ms':>10} {'after ms':>9} {'ratio':>7}")
    with BackgroundLoad() as load:
        for context in args.contexts:
            before = statistics.median(time_before(args.batch, context, args.steps)) * 1e3
            after = statistics.median(time_after(args.batch, context, args.steps)) * 1e3
            print(f"{context:>8} {before:>10.3f} {after:>9.3f} {before / after:>6.1f}x")
    print(load.describe())


if __name__ == "__main__":
    main()
