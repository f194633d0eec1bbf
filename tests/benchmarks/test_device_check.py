"""benchmarks/device_check.sh's orchestration on a CPU, with a stand-in interpreter that logs
each step's command (and fails the benchmark step): every step runs with its limit, the
summary JSON carries each exit code and the JUnit counts, a failed step fails the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "device_check.sh"

STAND_IN = """#!/bin/sh
if [ "$1" = "-" ]; then exec {python} "$@"; fi
echo "$*" >> {log}
case "$*" in
  *bench_gpu.py*) exit 3 ;;
  *test_cuda_graphs.py*)
    for arg in "$@"; do case "$arg" in --junitxml=*) xml="${{arg#--junitxml=}}" ;; esac; done
    echo '<testsuites><testsuite tests="3" failures="0" errors="0" skipped="1"/></testsuites>' > "$xml" ;;
esac
exit 0
"""


def test_steps_and_summary(tmp_path):
    log = tmp_path / "commands.log"
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN.format(python=sys.executable, log=log))
    stand_in.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)],
        env={**os.environ, "PYTHON": str(stand_in)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the benchmark step failed
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["kernels", "quant_kernels", "w8a8_kernels", "graphs", "bench_gpu"]
    for name in ("kernels", "quant_kernels", "w8a8_kernels"):
        assert summary[name]["exit_code"] == 0
    assert summary["graphs"] == {
        "exit_code": 0,
        "seconds": summary["graphs"]["seconds"],
        "timed_out": False,
        "passed": 2,
        "failed": 0,
        "skipped": 1,
    }
    assert summary["bench_gpu"]["exit_code"] == 3
    commands = log.read_text().splitlines()
    # The three kernel steps run at once, in any order; then the graphs, then the benchmark.
    first = sorted(commands[:3], key=lambda c: ("test_fused_moe" not in c, "w8a8" in c))
    assert "tests/model/test_fused_moe.py" in first[0]
    assert "tests/quantization/test_triton_quant.py" in first[1]
    assert "tests/quantization/test_triton_w8a8.py" in first[2]
    assert "-k real_graphs" in commands[3]
    assert "--backends triton" in commands[4] and str(out / "bench_gpu.json") in commands[4]
