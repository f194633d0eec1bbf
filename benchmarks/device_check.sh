#!/usr/bin/env bash
# The first GPU run: everything CPU CI cannot prove, in under 9 minutes on one H100 or H200.
#
#   benchmarks/device_check.sh OUT_DIR
#
# 1. kernels: the Triton kernel tests compiled and run on CUDA (attention, fused MoE, fused
#    layers) and the sampler's sync-free test on CUDA; at the same time, in two more processes
#    (the compiles are CPU-bound, one core each), quant_kernels: the quantized GEMM and fused
#    MoE kernels (W8A16 / W4A16) and w8a8_kernels: fp8 weights with per-token fp8 activations
#    (sm_89+; skipped below);
# 2. graphs: real CUDA-graph capture and replay equal eager (whole decode graphs and piecewise
#    prefill/mixed graphs), and with 2+ GPUs the W = 2 capture/replay over NCCL and the ctypes
#    NCCL communicator (distributed/nccl: equal to torch.distributed, captured all-reduce
#    replays equal eager);
# 3. bench_gpu.py with the Triton backend (graphs and eager decode, one prefill).
# Each step has its own time limit; OUT_DIR gets each step's JUnit XML / JSON report and log,
# and summary.json (per step: exit code, seconds, tests passed/failed/skipped). Exits non-zero
# when a step failed.
set -u
OUT=${1:?usage: benchmarks/device_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
: >"$OUT/steps.txt"

run_step() {  # name, seconds allowed, command...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
    # NOTE: a file, not an array: steps run in the background too
    echo "$name:$rc:$((SECONDS - start))" >>"$OUT/steps.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpus.csv" 2>&1

run_step kernels 120 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/kernels.xml" \
    tests/attention/test_triton_attention.py tests/model/test_fused_moe.py \
    $(ls tests/model/test_triton_layers.py 2>/dev/null) tests/sample/test_sampler_sync_free.py &
run_step quant_kernels 150 "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$OUT/quant_kernels.xml" tests/quantization/test_triton_quant.py &
run_step w8a8_kernels 120 "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$OUT/w8a8_kernels.xml" tests/quantization/test_triton_w8a8.py &
wait

run_step graphs 150 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/graphs.xml" \
    tests/worker/test_cuda_graphs.py tests/worker/test_verify_graphs.py tests/distributed/test_pynccl.py \
    -k "real_graphs or real_verify_graphs or real_nccl"

run_step bench_gpu 210 "$PY" benchmarks/bench_gpu.py --backends triton --modes graphs,eager \
    --batches 1,64 --contexts 4K --mixed 63x4K+1x128K --prefill-lens 8K --prefill-repeats 1 \
    --time-budget-s 150 --out "$OUT/bench_gpu.json"

"$PY" - "$OUT" $(cat "$OUT/steps.txt") <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
# NOTE: steps.txt is in completion order (some steps run at once); the summary is in run order.
ORDER = ["kernels", "quant_kernels", "w8a8_kernels", "graphs", "bench_gpu"]
specs = sorted(sys.argv[2:], key=lambda s: ORDER.index(s.split(":")[0]))
summary = {}
for spec in specs:
    name, rc, seconds = spec.rsplit(":", 2)
    step = {"exit_code": int(rc), "seconds": int(seconds), "timed_out": rc in ("124", "137")}
    junit = out / f"{name}.xml"
    if junit.is_file():
        suites = ET.parse(junit).getroot()
        suites = [suites] if suites.tag == "testsuite" else list(suites)
        total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        step["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
        step["failed"] = total["failures"] + total["errors"]
        step["skipped"] = total["skipped"]
    summary[name] = step
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
sys.exit(0 if all(s["exit_code"] == 0 for s in summary.values()) else 1)
EOF
