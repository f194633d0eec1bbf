"""Ops (kernel launches on a GPU) and host syncs of one decode step, on the real layer shapes.

One `ModelRunner.execute_model` decode step runs under `ernie_cluster.diagnostics.SyncRecorder`,
a torch dispatch mode that counts every aten op and every host sync (sync ops such as
`_local_scalar_dense` and `nonzero`, boolean-mask indexing, and the `.tolist()`/`.numpy()`/
`.cpu()`/`.item()` reads that no aten op shows on CPU). The
model has the full preset's widths (hidden 2560, 20/4 heads of 128, 64 experts of 1536 top-6
plus shared, vocab 103424) in bfloat16 on the CPU, routing spread over the experts, with 2 and 3 layers (one dense, then MoE);
the 28-layer figure is extrapolated: ops(2) + 26 x (ops(3) - ops(2)). Weights are random; the
counts do not depend on their values, only on the routing spread, which random weights give.

The same script runs on an older checkout too (it adapts to the old ModelRunner signature;
copy ernie_cluster/diagnostics.py along), which is how the "before" column of RESULTS.md
was taken.

Run: `.venv/bin/python benchmarks/bench_step_ops.py [--batches 1 32 256]`
"""

from __future__ import annotations

import argparse
import inspect

import torch
from common import code_version

from ernie_cluster.checkpoints.presets import preset_config
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.diagnostics import SyncRecorder
from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.step_io import (
    CachedRequestData,
    NewRequestData,
    SchedulerOutput,
)
from ernie_cluster.worker.model_runner import ModelRunner

BLOCK_SIZE = 16
PROMPT_LEN = 16


def make_model(num_layers: int) -> Ernie4_5_MoeForCausalLM:
    raw = preset_config("full") | {"num_hidden_layers": num_layers, "moe_layer_end_index": -1}
    config = ErnieMoeConfig.from_dict(raw)
    model = Ernie4_5_MoeForCausalLM(config, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                param.zero_()  # NOTE: a random bias would send every token to the same experts
            else:
                param.copy_(torch.randn(param.shape, generator=gen).mul_(0.02).to(param.dtype))
    return model.eval()


def make_runner(model, batch: int) -> ModelRunner:
    num_blocks = batch * 2
    if "config" in inspect.signature(ModelRunner).parameters:
        from ernie_cluster.config.engine_config import EngineConfig

        config = EngineConfig(
            model="unused", max_model_len=256, max_num_seqs=batch, block_size=BLOCK_SIZE
        )
        return ModelRunner(model, num_blocks, config)
    return ModelRunner(model, num_blocks, BLOCK_SIZE)  # the signature before the change


def count_decode_step(model, batch: int) -> tuple[int, int]:
    """(ops, host syncs) of one decode step of `batch` sequences after their prefill."""
    runner = make_runner(model, batch)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch)
    new = [
        NewRequestData(
            f"r{i}",
            torch.randint(3, 103000, (PROMPT_LEN,), generator=gen).tolist(),
            params,
            [],
            0,
            [2 * i, 2 * i + 1],
            0,
        )
        for i in range(batch)
    ]
    ids = [n.req_id for n in new]
    runner.execute_model(
        SchedulerOutput(new_requests=new, num_scheduled_tokens=dict.fromkeys(ids, PROMPT_LEN))
    )
    decode = SchedulerOutput(
        cached_requests=[CachedRequestData(r, [], PROMPT_LEN) for r in ids],
        num_scheduled_tokens=dict.fromkeys(ids, 1),
    )
    with SyncRecorder() as recorder:
        runner.execute_model(decode)
    return sum(recorder.ops.values()), len(recorder.syncs) + len(recorder.readouts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"code: {code_version()}")
    counts = {}
    for layers in (2, 3):
        model = make_model(layers)
        counts[layers] = {b: count_decode_step(model, b) for b in args.batches}
        del model
    print("decode step, full-preset widths, bf16; 28 layers = ops(2) + 26 x (ops(3) - ops(2))")
    print(f"{'batch':>6} {'ops/step':>9} {'syncs/step':>11} {'ops/MoE layer':>14}")
    for batch in args.batches:
        (ops2, syncs2), (ops3, syncs3) = counts[2][batch], counts[3][batch]
        ops = ops2 + 26 * (ops3 - ops2)
        syncs = syncs2 + 26 * (syncs3 - syncs2)
        print(f"{batch:>6} {ops:>9} {syncs:>11} {ops3 - ops2:>14}")


if __name__ == "__main__":
    main()
