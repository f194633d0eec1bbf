"""What one HTTP ingress process pays to import its code: seconds, modules and peak RSS of a
fresh interpreter importing each ingress module, against FastAPI + pydantic + Ray Serve alone
(the floor any Serve ingress pays), measured in the same run, contenders interleaved. One
contender also starts the ingress as a replica does (settings from the demo checkpoint:
tokenizer, chat template, limits).

    .venv/bin/python benchmarks/bench_ingress_import.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

BASELINE = "fastapi,pydantic,ray.serve"
MODULES = (
    "ernie_cluster",
    "ernie_cluster.serving.http_app",
    "ernie_cluster.serving.ray_serve.ingress",
    "ray.serve,ernie_cluster.serving.ray_serve.ingress",
    "ernie_cluster.serving.ray_serve.model_server",
)
STARTED = "ray.serve,ernie_cluster.serving.ray_serve.ingress + ingress_settings"
START_INGRESS = """
from ernie_cluster.checkpoints.demo import demo_checkpoint
from ernie_cluster.serving.ray_serve.config import ServeAppConfig
from ernie_cluster.serving.ray_serve.ingress import ingress_settings
ingress_settings(ServeAppConfig(), str(demo_checkpoint()))
"""
HEAVY = ("torch", "xgrammar", "transformers")

MEASURE = """
import importlib, json, resource, sys, time
start = time.perf_counter()
for name in sys.argv[1].split(","):
    importlib.import_module(name)
exec(sys.argv[3])
seconds = time.perf_counter() - start
print(json.dumps({
    "seconds": seconds,
    "modules": len(sys.modules),
    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    "heavy": sorted(m for m in sys.argv[2].split(",") if m in sys.modules),
}))
"""


def measure(contender: str) -> dict:
    modules, _, start = contender.partition(" + ")
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, modules, ",".join(HEAVY), START_INGRESS if start else ""],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    contenders = (BASELINE, *MODULES, STARTED)
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name in contenders:  # interleaved: a slow spell hits every contender alike
            runs[name].append(measure(name))
    base_s = statistics.median(r["seconds"] for r in runs[BASELINE])
    base_rss = statistics.median(r["rss_mb"] for r in runs[BASELINE])
    print(f"{'imports':68s} {'s (median)':>10s} {'x base':>7s} {'modules':>8s} {'RSS MB':>7s}")
    for name in contenders:
        seconds = statistics.median(r["seconds"] for r in runs[name])
        rss = statistics.median(r["rss_mb"] for r in runs[name])
        modules = runs[name][-1]["modules"]
        heavy = runs[name][-1]["heavy"]
        print(
            f"{name:68s} {seconds:10.2f} {seconds / base_s:7.2f} {modules:8d} {rss:7.0f}"
            f"  RSS x{rss / base_rss:.2f}{'  loads ' + ','.join(heavy) if heavy else ''}"
        )


if __name__ == "__main__":
    main()
