"""Ops (kernel launches on a GPU) and host syncs of one decode step, on the real layer shapes.

One `ModelRunner.execute_model` decode step runs under `ernie_cluster_tools.diagnostics.SyncRecorder`,
a torch dispatch mode that counts every aten op and every host sync (sync ops such as
`_local_scalar_dense` and `nonzero`, boolean-mask indexing, and the `.tolist()`/`.numpy()`/
`.cpu()`/`.item()` reads that no aten op shows on CPU). The
model has the full preset's widths (hidden 2560, 20/4 heads of 128, 64 experts of 1536 top-6
plus shared, vocab 103424) in bfloat16 on the CPU, routing spread over the experts, with 2 and 3 layers (one dense, then MoE);
the 28-layer figure is extrapolated: ops(2) + 26 x (ops(3) - ops(2)). Weights are random; the
counts do not depend on their values, only on the routing spread, which random weights give.

The same script runs on an older checkout too (it adapts to the old ModelRunner signature;
copy the ernie_cluster_tools/ folder along), which is how the "before" column of RESULTS.md
was taken.

`--gpu-path` counts instead the KERNELS a decode step launches on the GPU code path (Triton
attention, the Triton MoE and the fused Triton kernels of model/triton_layers and
model/triton_router), run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1) under
`ernie_cluster_tools.kernel_counter.KernelCounter`: aten ops that launch a kernel (no views, no
allocations) plus Triton launches, per MoE layer and per step, at batch 1, 8 and 64. The model
has the full preset's structure (20/4 heads, 64 experts top-6, 2 shared experts) at small
widths, which the count does not depend on; the KV splits of decode attention follow the
sequences' 16-token contexts (one split, no merge kernel).

Run: `.venv/bin/python benchmarks/bench_step_ops.py [--batches 1 32 256] [--gpu-path]`
"""

from __future__ import annotations

import argparse
import inspect
import os
from collections import Counter

import torch
from common import code_version

from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.step_io import (
    CachedRequestData,
    NewRequestData,
    SchedulerOutput,
)
from ernie_cluster.worker.model_runner import ModelRunner
from ernie_cluster_tools.diagnostics import SyncRecorder
from ernie_cluster_tools.fixtures.presets import preset_config
from ernie_cluster_tools.kernel_counter import KernelCounter, use_gpu_path

BLOCK_SIZE = 16
PROMPT_LEN = 16


# The full preset's structure at widths the interpreter runs quickly (--gpu-path).
GPU_PATH_WIDTHS = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "head_dim": 16,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
}


def make_model(num_layers: int, widths: dict | None = None) -> Ernie4_5_MoeForCausalLM:
    raw = preset_config("full") | {"num_hidden_layers": num_layers, "moe_layer_end_index": -1}
    config = ErnieMoeConfig.from_dict(raw | (widths or {}))
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


def prefilled_runner(model, batch: int) -> tuple[ModelRunner, SchedulerOutput]:
    """A runner whose `batch` sequences are prefilled, and their next decode step."""
    runner = make_runner(model, batch)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch)
    new = [
        NewRequestData(
            f"r{i}",
            torch.randint(3, model.config.vocab_size, (PROMPT_LEN,), generator=gen).tolist(),
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
    return runner, decode


def count_decode_step(model, batch: int) -> tuple[int, int]:
    """(ops, host syncs) of one decode step of `batch` sequences after their prefill."""
    runner, decode = prefilled_runner(model, batch)
    with SyncRecorder() as recorder:
        runner.execute_model(decode)
    return sum(recorder.ops.values()), len(recorder.syncs) + len(recorder.readouts)


def count_gpu_path_kernels(model, batch: int) -> tuple[KernelCounter, Counter[str]]:
    """One decode step of `batch` sequences on the GPU path -> (its KernelCounter, the kernels
    of the model's last layer by name). The prefill before it runs on the CPU path: it is not
    counted, and interpreted it would take minutes."""
    use_gpu_path(model, False)
    runner, decode = prefilled_runner(model, batch)
    use_gpu_path(model, True)
    marks: list[Counter[str]] = []
    layer = model.layers[-1]
    hooks = [
        layer.register_forward_pre_hook(lambda *_: marks.append(counter.by_name())),
        layer.register_forward_hook(lambda *_: marks.append(counter.by_name())),
    ]
    try:
        with KernelCounter() as counter:
            runner.execute_model(decode)
    finally:
        for hook in hooks:
            hook.remove()
    return counter, marks[1] - marks[0]


def gpu_path_per_layer(batches: list[int]) -> dict[int, dict[str, object]]:
    """batch -> kernels of one MoE layer (total, and by name) and of the 28-layer step, from
    a 2-layer model (dense, then MoE): its step + 26 x its MoE layer."""
    model = make_model(2, GPU_PATH_WIDTHS)
    result = {}
    for batch in batches:
        counter, layer = count_gpu_path_kernels(model, batch)
        per_layer = sum(layer.values())
        result[batch] = {
            "per_moe_layer": per_layer,
            "triton_launches": sum(layer[name] for name in counter.triton_launches),
            "by_name": dict(sorted(layer.items())),
            "per_step": counter.total + 26 * per_layer,
        }
    return result


def main_gpu_path(batches: list[int]) -> None:
    result = gpu_path_per_layer(batches)
    print("decode step on the GPU path (TRITON_INTERPRET=1), kernels = torch ops + Triton")
    print("launches; 28 layers = the step of 2 layers (dense, MoE) + 26 x its MoE layer")
    print(f"{'batch':>6} {'kernels/step':>13} {'kernels/MoE layer':>18} {'of which Triton':>16}")
    for batch, row in result.items():
        print(
            f"{batch:>6} {row['per_step']:>13} {row['per_moe_layer']:>18} "
            f"{row['triton_launches']:>16}"
        )
    print("MoE layer by name (last batch):", result[batches[-1]]["by_name"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument(
        "--gpu-path", action="store_true", help="count GPU-path kernels (Triton interpreter)"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"code: {code_version()}")
    if args.gpu_path:
        # NOTE: before any Triton kernel is defined (triton.jit reads it when decorating).
        os.environ["TRITON_INTERPRET"] = "1"
        main_gpu_path(args.batches or [1, 8, 64])
        return
    args.batches = args.batches or [1, 32, 256]
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
