"""Every Triton kernel of the GPU path compiles ahead of time for sm_90a and sm_80 with Triton's
own compiler (no GPU needed), in every configuration its launcher can select (quantized weights
included), without register spills and within the architecture's shared memory. The compiles
run in a fresh process (tests/model/aot_compile.py): the interpreter that other tests switch on
would replace them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parent / "aot_compile.py"
# Largest dynamic shared memory one block may opt into (CUDA programming guide, compute
# capabilities): 227 KB on sm_90, 163 KB on sm_80.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
# Every kernel the GPU path launches (the model's, attention's, the routing ones and the
# quantized GEMM's).
KERNELS = {
    "_rms_norm_kernel",
    "_rope_kernel",
    "_silu_mul_kernel",
    "_router_kernel",
    "_sort_to_tiles_kernel",
    "gate_up_kernel",
    "down_kernel",
    "_combine_kernel",
    "_write_kv_kernel",
    "_decode_split_kernel",
    "_merge_splits_kernel",
    "_prefill_kernel",
    "_quant_matmul_kernel",
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80], ids=["sm_90", "sm_80"])
def test_every_kernel_compiles_without_spills_within_shared_memory(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(arch)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
        cwd=SCRIPT.parents[2],
    )
    assert run.returncode == 0, run.stderr[-4000:]
    variants = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert {v["kernel"] for v in variants} == KERNELS
    assert len(variants) >= 50  # every config of every kernel, both dtypes
    # The fp8 KV cache's attention kernels (sm_89+ only; the torch backend serves it below).
    over_fp8 = {
        v["kernel"] for v in variants if any("fp8e4nv" in t for t in v["signature"].values())
    }
    attention = {"_write_kv_kernel", "_decode_split_kernel", "_prefill_kernel"}
    assert attention <= over_fp8 if arch >= 89 else not attention & over_fp8
    errors = [v for v in variants if "error" in v]
    assert not errors, errors
    # ptxas puts spilled registers on the stack (local memory): none may have any.
    spills = [v for v in variants if v["STACK"] or v["LOCAL"]]
    assert not spills, spills
    too_big = [v for v in variants if v["shared"] > SHARED_LIMIT[arch]]
    assert not too_big, too_big
