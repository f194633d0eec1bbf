"""`serve run deploy/serve_config.cpu.yaml` works on a laptop (issue 14, item 15): the config is
valid, stays on loopback, and Ray Serve's own CLI brings the demo model up on the CPU and
answers a chat completion. The config's port is swapped for a free one; the `serve run`
process starts its own local Ray (`-a local`) and is stopped with its whole process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from ernie_cluster.distributed.process_group import free_port
from ernie_cluster.serving.ray_serve.config import ServeAppConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = REPO_ROOT / "deploy" / "serve_config.cpu.yaml"


def test_cpu_config_is_valid_and_on_loopback():
    config = yaml.safe_load(CONFIG.read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    (app,) = config["applications"]
    args = ServeAppConfig.model_validate(app["args"])
    assert args.device == "cpu" and args.model is None  # the built-in demo model
    assert args.tensor_parallel_size == 1


@pytest.mark.slow
def test_serve_run_brings_the_demo_up(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    port = free_port()
    config["http_options"]["port"] = port
    local_config = tmp_path / "serve_config.cpu.yaml"
    local_config.write_text(yaml.safe_dump(config))
    serve = Path(sys.executable).with_name("serve")
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [str(serve), "run", "-a", "local", str(local_config)],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        response = httpx.post(
            f"{base}/v1/chat/completions",
            json={
                "model": "ernie-demo",
                "messages": [{"role": "user", "content": "Hello!"}],
                "max_tokens": 16,
            },
            timeout=120,
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()
