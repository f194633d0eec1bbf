"""Every Triton kernel of the GPU path compiles ahead of time for sm_90a and sm_80 with Triton's
own compiler (no GPU needed), in every configuration its launcher can select (quantized weights
included), without register spills and within the architecture's shared memory; and the W8A8
kernels (fp8 weights times per-token fp8 activations) for sm_89 too, where shared memory is
smallest. The compiles run in a fresh process (tests/model/aot_compile.py): the interpreter
that other tests switch on would replace them.
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
# capabilities): 227 KB on sm_90, 99 KB on sm_89, 163 KB on sm_80.
SHARED_LIMIT = {90: 227 * 1024, 89: 99 * 1024, 80: 163 * 1024}
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
    "_quantize_rows_kernel",  # W8A8's activations, sm_89+
}
# The kernels W8A8 runs with e4m3 activations, and the argument that carries them.
W8A8_OPERAND = {
    "_quant_matmul_kernel": "x_ptr",
    "gate_up_kernel": "x_ptr",
    "down_kernel": "act_ptr",
}


def compile_for(arch: int, *parts: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(arch), *parts],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
        cwd=SCRIPT.parents[2],
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def w8a8_kernels(variants: list[dict]) -> set[str]:
    """Kernels compiled with e4m3 activations."""
    return {
        v["kernel"]
        for v in variants
        if v["signature"].get(W8A8_OPERAND.get(v["kernel"], ""), "") == "*fp8e4nv"
    }


def assert_compiled_within_limits(variants: list[dict], arch: int) -> None:
    errors = [v for v in variants if "error" in v]
    assert not errors, errors
    # ptxas puts spilled registers on the stack (local memory): none may have any.
    spills = [v for v in variants if v["STACK"] or v["LOCAL"]]
    assert not spills, spills
    too_big = [v for v in variants if v["shared"] > SHARED_LIMIT[arch]]
    assert not too_big, too_big


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80], ids=["sm_90", "sm_80"])
def test_every_kernel_compiles_without_spills_within_shared_memory(arch):
    variants = compile_for(arch)
    expected = KERNELS if arch >= 89 else KERNELS - {"_quantize_rows_kernel"}
    assert {v["kernel"] for v in variants} == expected
    assert len(variants) >= 50  # every config of every kernel, both dtypes
    # fp8 weights run W8A8 from sm_89 (e4m3 activations), W8A16 on sm_80
    assert w8a8_kernels(variants) == (set(W8A8_OPERAND) if arch >= 89 else set())
    # The fp8 KV cache's attention kernels (sm_89+ only; the torch backend serves it below).
    over_fp8 = {
        v["kernel"] for v in variants if any("fp8e4nv" in t for t in v["signature"].values())
    }
    attention = {"_write_kv_kernel", "_decode_split_kernel", "_prefill_kernel"}
    assert attention <= over_fp8 if arch >= 89 else not attention & over_fp8
    assert_compiled_within_limits(variants, arch)


@pytest.mark.slow
def test_w8a8_kernels_compile_for_sm89():
    """Ada (L4, L40S) runs W8A8 with 99 KB of shared memory per block."""
    variants = compile_for(89, "w8a8")
    assert w8a8_kernels(variants) == set(W8A8_OPERAND)
    assert "_quantize_rows_kernel" in {v["kernel"] for v in variants}
    assert_compiled_within_limits(variants, 89)
