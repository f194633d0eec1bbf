"""benchmarks/bench_gpu.py --smoke end to end: the GPU benchmark's whole path (random model,
ModelRunner steps fed hand-built SchedulerOutputs, rooflines, report) on a CPU with the tiny
preset, as a subprocess. Checks that every figure is in the JSON, not what it is."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "bench_gpu.py"

# What --smoke runs (its defaults in the script).
DECODE_CASES = {"1x32", "2x32", "1x64", "2x64", "3x32+1x128"}
MODES = {"graphs", "eager"}
PROMPTS = {64, 256}
DECODE_FIGURES = (
    "step_seconds_mean",
    "step_seconds_p50",
    "tokens_per_s",
    "roofline_bytes",
    "roofline_step_seconds",
    "roofline_tokens_per_s",
    "roofline_fraction",
    "active_experts_per_layer",
    "active_experts_uniform",
    "kv_tokens_per_step",
)
PREFILL_FIGURES = ("seconds", "tokens_per_s", "flops", "roofline_seconds", "roofline_fraction")


def positive(entry: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = entry[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, entry)


@pytest.mark.slow  # a subprocess of ~15 s on a 2-core machine
def test_smoke_run_reports_every_figure(tmp_path):
    out = tmp_path / "bench_gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "decode: tok/s" in proc.stdout and "prefill:" in proc.stdout
    report = json.loads(out.read_text())

    assert report["machine"] and report["code"] and report["utc"]
    assert set(report["roofline"]) == {"bandwidth", "matmul", "decode", "prefill"}
    positive(report["calibration"], ("copy_bandwidth_bytes_per_s", "matmul_flops_per_s"))
    positive(report["model"], ("non_expert_bytes", "expert_bytes", "kv_bytes_per_token"))
    assert "backend_errors" not in report

    decode = {(e["backend"], e["mode"], e["case"]): e for e in report["decode"]}
    assert set(decode) == {("torch", mode, case) for mode in MODES for case in DECODE_CASES}
    for entry in decode.values():
        assert entry["status"] == "ok", entry
        positive(entry, DECODE_FIGURES)
        assert entry["active_experts_source"] == "measured"
        assert 1 <= entry["active_experts_per_layer"] <= report["model"]["num_experts"]
        assert entry["kv_aliased"] is False
    # no graph is captured on a CPU: the graphs rows say so instead of claiming graphs
    assert not any(entry["cuda_graphs"] for entry in decode.values())
    assert "no-graph" in proc.stdout
    mixed = decode[("torch", "eager", "3x32+1x128")]
    assert mixed["batch"] == 4 and mixed["contexts"] == {"32": 3, "128": 1}

    prefill = {(e["backend"], e["prompt_tokens"]): e for e in report["prefill"]}
    assert set(prefill) == {("torch", p) for p in PROMPTS}
    for entry in prefill.values():
        assert entry["status"] == "ok", entry
        positive(entry, PREFILL_FIGURES)
    assert prefill[("torch", 256)]["num_chunks"] == 4  # 64-token chunks


def test_defaults_run_triton_and_torch_skips_past_16k():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_gpu
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert bench_gpu.parse_args([]).backends == "triton"
    assert bench_gpu.torch_skip("torch", 16384) is None
    assert bench_gpu.torch_skip("torch", 131072)
    assert bench_gpu.torch_skip("triton", 131072) is None
    assert bench_gpu.mode_label({"mode": "graphs", "cuda_graphs": False}) == "no-graph"
    assert bench_gpu.mode_label({"mode": "graphs", "cuda_graphs": True}) == "graphs"
