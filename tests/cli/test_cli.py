"""The `ernie-cluster` command: make-tiny, offline generate, serve flags (the README's demo path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ernie_cluster.checkpoints.demo import DEMO_NAME
from ernie_cluster.cli.main import build_parser, serve_config_from_args


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ernie_cluster.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "make-tiny" in result.stdout and "generate" in result.stdout


def test_generate_on_demo_checkpoint(tmp_path):
    """No --model: the demo checkpoint is made in the cache on first use, then reused."""
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    first = run_cli("generate", "--chat", "--prompt", "Hi", "--max-tokens", "5", env=env)
    assert first.returncode == 0, first.stderr
    line = json.loads(first.stdout.strip().splitlines()[-1])
    assert len(line["token_ids"]) >= 1 and line["finish_reason"] in ("stop", "length")
    assert (tmp_path / "ernie-cluster" / DEMO_NAME / "config.json").is_file()
    second = run_cli("generate", "--chat", "--prompt", "Hi", "--max-tokens", "5", env=env)
    assert json.loads(second.stdout.strip().splitlines()[-1]) == line


def test_make_tiny_and_bad_flags(tmp_path):
    result = run_cli("make-tiny", str(tmp_path / "ck"), "--preset", "tiny", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ck" / "model.safetensors.index.json").is_file()
    bad = run_cli("generate", "--model", str(tmp_path / "ck"), "--max-model-len", "0")
    assert bad.returncode == 2 and "max_model_len must be >= 1" in bad.stderr


def serve_config(*flags: str):
    return serve_config_from_args(build_parser().parse_args(["serve", *flags]))


def test_serve_autoscaling_delay_flags():
    config = serve_config(
        *("--min-replicas", "1", "--max-replicas", "3"),
        *("--upscale-delay-s", "5", "--downscale-delay-s", "20.5"),
    )
    assert config.autoscaling is not None
    assert (config.autoscaling.min_replicas, config.autoscaling.max_replicas) == (1, 3)
    assert config.autoscaling.upscale_delay_s == 5.0
    assert config.autoscaling.downscale_delay_s == 20.5


def test_serve_delay_flag_alone_implies_autoscaling():
    assert serve_config().autoscaling is None
    assert serve_config("--max-replicas", "2").autoscaling.upscale_delay_s is None
    config = serve_config("--downscale-delay-s", "0")
    assert config.num_replicas is None
    assert config.autoscaling.model_dump(exclude_none=True) == {
        "min_replicas": 1,
        "max_replicas": 1,
        "target_ongoing_requests": 16.0,
        "downscale_delay_s": 0.0,
    }
    with pytest.raises(ValueError, match="either num_replicas or autoscaling"):
        serve_config("--num-replicas", "2", "--upscale-delay-s", "5")
    with pytest.raises(ValueError, match="upscale_delay_s"):
        serve_config("--upscale-delay-s", "-1")


@pytest.mark.slow
def test_serve_command_answers_then_stops(tmp_path):
    """`ernie-cluster serve` (the README's first command) on the demo checkpoint."""
    import signal
    import time

    import httpx

    from ernie_cluster.distributed.process_group import free_port

    port = free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ernie_cluster.cli.main",
            "serve",
            "--port",
            str(port),
            "--num-cpus",
            "4",
            "--reasoning-parser",
            "ernie_x1",
            "--dtype",
            "float32",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        else:
            pytest.fail("server did not become healthy within 120 s")
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={
                "model": "ernie-demo",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            },
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_serve_without_ray_refuses_shards_and_replicas(capsys):
    from ernie_cluster.cli.main import main

    assert main(["serve", "--no-ray-serve", "--tensor-parallel-size", "2"]) == 2
    assert "--tensor-parallel-size (2)" in capsys.readouterr().err
    assert main(["serve", "--no-ray-serve", "--num-replicas", "2"]) == 2


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_gpu_engine_flags_documented(command, capsys):
    from ernie_cluster.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())
    assert "--gpu-memory-utilization" in usage and "default 0.9" in usage
    assert "--attention-backend {auto,triton,torch}" in usage
    assert "--enforce-eager" in usage and "without capturing CUDA graphs" in usage


def test_gpu_engine_flags_reach_the_engine_config():
    from ernie_cluster.cli.main import engine_kwargs
    from ernie_cluster.config.engine_config import EngineConfig

    defaults = engine_kwargs(build_parser().parse_args(["generate"]))
    assert (
        defaults["gpu_memory_utilization"],
        defaults["attention_backend"],
        defaults["enforce_eager"],
    ) == (0.9, "auto", False)
    flags = ("--gpu-memory-utilization", "0.75", "--attention-backend", "torch", "--enforce-eager")
    engine = EngineConfig(
        model="m", **engine_kwargs(build_parser().parse_args(["generate", *flags]))
    )
    assert (engine.gpu_memory_utilization, engine.attention_backend, engine.enforce_eager) == (
        0.75,
        "torch",
        True,
    )
    served = serve_config(*flags).engine_config("m")
    assert (served.gpu_memory_utilization, served.attention_backend, served.enforce_eager) == (
        0.75,
        "torch",
        True,
    )


def test_gpu_engine_flags_rejected(tmp_path, capsys):
    from ernie_cluster.cli.main import main

    missing = str(tmp_path / "no-model")
    assert main(["generate", "--model", missing, "--gpu-memory-utilization", "1.5"]) == 2
    assert "gpu_memory_utilization must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert main(["generate", "--model", missing, "--gpu-memory-utilization", "0"]) == 2
    assert "got 0.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        serve_config("--gpu-memory-utilization", "1.01")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--attention-backend", "flash"])
    assert "invalid choice: 'flash'" in capsys.readouterr().err
