"""The GPU path's kernel budget, counted on CPU: a decode step through `ModelRunner` on the GPU
code path (Triton attention, Triton MoE, the fused kernels) launches at most 25 kernels per MoE
layer, the same number at batch 1 and 64. A count, not a time: `benchmarks/bench_step_ops.py
--gpu-path` runs the step in Triton's interpreter under `KernelCounter` (aten ops that launch a
kernel + Triton launches). Also: the counter's own rules (views and allocations launch nothing).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

pytest.importorskip("triton")

from ernie_cluster_tools.kernel_counter import KernelCounter, launches_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_step_ops

BUDGET_PER_MOE_LAYER = 25
# The kernels the fusions leave per MoE layer, by family (see the bench's docstring).
FUSED = {
    "_rms_norm_kernel",
    "_rope_kernel",
    "_router_kernel",
    "_sort_to_tiles_kernel",
    "gate_up_kernel",
    "down_kernel",
    "_combine_kernel",
    "_silu_mul_kernel",
    "_write_kv_kernel",
    "_decode_split_kernel",
}


def test_counter_counts_work_not_views_or_allocations():
    x = torch.randn(4, 6)
    # NOTE: as the model runs: inference mode keeps `to` and `reshape` whole (outside it they
    # reach the counter as `_to_copy` and `clone`).
    with torch.inference_mode(), KernelCounter() as counter:
        y = x.view(6, 4).t()[1:]  # views
        torch.empty(3)
        z = y + 1.0  # one kernel
        z.mul_(2.0)  # one kernel
        x.to(torch.float32)  # already float32: returns x
        x.to(torch.bfloat16)  # a conversion kernel
        x.reshape(24)  # a view
        x.t().reshape(24)  # a copy
    assert counter.by_name() == {"add": 1, "mul_": 1, "to": 1, "reshape": 1}
    assert counter.total == 4
    assert launches_kernel(torch.ops.aten.mm.default)
    assert not launches_kernel(torch.ops.aten.transpose.int)


@pytest.mark.slow
def test_decode_step_kernels_per_moe_layer_within_budget_and_flat_in_batch():
    result = bench_step_ops.gpu_path_per_layer([1, 64])
    one, many = result[1], result[64]
    assert one["by_name"] == many["by_name"], (one, many)
    assert one["per_moe_layer"] <= BUDGET_PER_MOE_LAYER, one["by_name"]
    # The GPU path really ran: its Triton kernels, not the torch glue they replace.
    assert set(one["by_name"]) >= FUSED, one["by_name"]
    assert not {"softmax", "topk", "argsort", "cumsum", "scatter_add_", "index_copy_"} & set(
        one["by_name"]
    )
