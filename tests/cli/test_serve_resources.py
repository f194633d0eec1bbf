"""`ernie-cluster serve` and the resources its app reserves: a local Ray gets enough logical
CPUs for every shard worker (a TP2 app on a 2-core machine becomes healthy), and a Ray that
cannot place the app ends the command at once with one line naming what is needed and what
there is."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from ernie_cluster.cli.ray_resources import app_resources, local_num_cpus, replica_bounds
from ernie_cluster.distributed.process_group import free_port
from ernie_cluster.serving.ray_serve.config import AutoscalingConfig, ServeAppConfig


def test_app_resources_count_replica_shards_and_ingress():
    tp2 = ServeAppConfig(tensor_parallel_size=2)
    assert app_resources(tp2, 1) == {"CPU": 3.5, "GPU": 0}  # replica + 2 shards + ingress
    assert app_resources(ServeAppConfig(), 2) == {"CPU": 2.5, "GPU": 0}
    assert app_resources(ServeAppConfig(single_hop=True), 1) == {"CPU": 1, "GPU": 0}
    gpu = ServeAppConfig(tensor_parallel_size=4, device="cuda")
    assert app_resources(gpu, 1) == {"CPU": 5.5, "GPU": 4}
    scaling = AutoscalingConfig(min_replicas=0, max_replicas=3)
    assert replica_bounds(ServeAppConfig(autoscaling=scaling)) == (1, 3)
    assert replica_bounds(ServeAppConfig(num_replicas=2)) == (2, 2)


def test_local_ray_gets_the_cpus_the_shards_need(monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    tp2 = ServeAppConfig(tensor_parallel_size=2)
    assert local_num_cpus(tp2, None) == 4
    assert "4 logical CPUs on 2 cores" in capsys.readouterr().out
    assert local_num_cpus(ServeAppConfig(), None) == 2  # fits: the cores, no message
    assert capsys.readouterr().out == ""
    assert local_num_cpus(tp2, 2) == 2  # --num-cpus is taken as given


def serve_command(port: int, *flags: str) -> list[str]:
    command = [sys.executable, "-m", "ernie_cluster.cli.main", "serve", "--port", str(port)]
    return [*command, "--dtype", "float32", "--tensor-parallel-size", "2", *flags]


@pytest.mark.slow
def test_too_few_cpus_is_one_line_within_a_minute(tiny_checkpoint):
    port = free_port()
    started = time.monotonic()
    done = subprocess.run(
        serve_command(port, "--model", str(tiny_checkpoint), "--num-cpus", "2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < 60
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "need 3.5 CPUs and 0 GPUs" in line and "has 2 CPUs" in line, line
    assert "--num-cpus" in line


@pytest.mark.slow
def test_tp2_on_two_cores_becomes_healthy(tiny_checkpoint):
    """No --num-cpus on a 2-core machine (pinned to two cores where taskset exists)."""
    port = free_port()
    command = serve_command(port, "--model", str(tiny_checkpoint), "--served-model-name", "tiny")
    if shutil.which("taskset"):
        command = ["taskset", "-c", "0,1", *command]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "not healthy within 180 s"
            time.sleep(1)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
