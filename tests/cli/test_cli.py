"""The `ernie-cluster` command: make-tiny, offline generate, serve flags (the README's demo path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ernie_cluster.cli.main import build_parser
from ernie_cluster.cli.serve import serve_config_from_args


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ernie_cluster.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow  # a child process that imports torch: 2-7 s
def test_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "make-tiny" in result.stdout and "generate" in result.stdout


@pytest.mark.slow  # two child processes that each load torch and the model: about 10 s
def test_generate_on_demo_checkpoint(tmp_path):
    """No --model: the shipped demo model answers a greeting, greedy, the same way twice, and
    nothing is written to the user's cache. `--chat` prints reasoning and answer apart, with
    room (the default max tokens) to finish both."""
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    args = ("generate", "--chat", "--prompt", "Hello!", "--temperature", "0")
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    line = json.loads(first.stdout.strip().splitlines()[-1])
    assert line["finish_reason"] == "stop"
    assert line["reasoning_content"] and line["content"]
    assert not any(tag in line["content"] for tag in ("<response>", "</think>", "</response>"))
    assert not list(tmp_path.iterdir())
    second = run_cli(*args, env=env)
    assert json.loads(second.stdout.strip().splitlines()[-1]) == line


@pytest.mark.slow  # two child processes: about 6 s
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
    from ernie_cluster.cli.model_args import model_values
    from ernie_cluster.config.engine_config import EngineConfig, EngineSettings

    def engine_kwargs(args):
        return model_values(args, EngineSettings)

    defaults = engine_kwargs(build_parser().parse_args(["generate"]))
    assert (
        defaults["gpu_memory_utilization"],
        defaults["attention_backend"],
        defaults["enforce_eager"],
    ) == (0.9, "auto", False)
    flags = ("--gpu-memory-utilization", "0.75", "--attention-backend", "torch", "--enforce-eager")
    engine = EngineConfig(
        **{**engine_kwargs(build_parser().parse_args(["generate", *flags])), "model": "m"}
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


# ------------------------------------------------------------------------ the HTTP port
@pytest.fixture
def taken_port():
    """A port held the way a running Ray Serve proxy holds it (SO_REUSEPORT, listening)."""
    import socket

    from ernie_cluster.distributed.process_group import free_port

    for _ in range(5):
        port = free_port()
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            holder.bind(("127.0.0.1", port))
        except OSError:
            holder.close()
            continue
        holder.listen()
        try:
            yield port
        finally:
            holder.close()
        return
    pytest.fail("no free port to hold")


@pytest.mark.parametrize("mode", [[], ["--no-ray-serve"]], ids=["ray-serve", "one-process"])
def test_serve_refuses_a_taken_port_in_one_line(taken_port, mode, capsys, tmp_path):
    """A second server on a taken port fails at once instead of sharing it (Ray Serve's
    proxies bind with SO_REUSEPORT, so two apps would split the requests)."""
    from ernie_cluster.cli.main import main

    missing = str(tmp_path / "never-loaded")  # the port is checked before the model
    assert main(["serve", *mode, "--model", missing, "--port", str(taken_port)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert f"port {taken_port} is already in use" in lines[0]
    assert "--port" in lines[0] and "PORT=" in lines[0]
    assert "OpenAI API at" not in captured.out


def test_serve_refuses_a_bad_host_in_one_line(capsys, tmp_path):
    from ernie_cluster.cli.main import main

    missing = str(tmp_path / "never-loaded")
    assert main(["serve", "--no-ray-serve", "--model", missing, "--host", "192.0.2.1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cannot listen on 192.0.2.1:8000" in line


# ------------------------------------------------------------------------------ API key
def test_api_key_from_the_environment_or_a_file(tmp_path, monkeypatch):
    from ernie_cluster.serving.ray_serve.config import API_KEY_ENV

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert serve_config().with_api_key_resolved().api_key is None
    monkeypatch.setenv(API_KEY_ENV, "sk-from-env\n")
    assert serve_config().with_api_key_resolved().api_key == "sk-from-env"
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    resolved = serve_config("--api-key-file", str(key_file)).with_api_key_resolved()
    assert (resolved.api_key, resolved.api_key_file) == ("sk-from-file", None)
    assert serve_config("--api-key", "sk-flag").with_api_key_resolved().api_key == "sk-flag"
    # what build_app hands to the ingress validates again
    type(resolved).model_validate(resolved.model_dump())


def test_api_key_flags_rejected(tmp_path, capsys):
    from ernie_cluster.cli.main import main

    key_file = tmp_path / "key"
    key_file.write_text("sk-x")
    with pytest.raises(ValueError, match="either api_key or api_key_file"):
        serve_config("--api-key", "a", "--api-key-file", str(key_file))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        serve_config("--api-key-file", str(empty)).with_api_key_resolved()
    with pytest.raises(ValueError, match="cannot read the API key file"):
        serve_config("--api-key-file", str(tmp_path / "missing")).with_api_key_resolved()
    assert main(["serve", "--api-key-file", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    assert serve_config("--api-key-all-routes", "--api-key", "k").api_key_all_routes


@pytest.mark.slow
def test_one_process_server_takes_the_key_from_a_file(tmp_path, tiny_checkpoint):
    """`serve --no-ray-serve --api-key-file`: the key guards /v1 (401 + WWW-Authenticate
    without it) and never appears on the command line."""
    import signal
    import time

    import httpx

    from ernie_cluster.distributed.process_group import free_port

    key = "sk-secret-from-file"
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "ernie_cluster.cli.main",
        "serve",
        "--no-ray-serve",
        "--model",
        str(tiny_checkpoint),
        "--served-model-name",
        "tiny",
        "--port",
        str(port),
        "--api-key-file",
        str(key_file),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with open(f"/proc/{proc.pid}/cmdline", "rb") as cmdline:
            assert key.encode() not in cmdline.read()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        else:
            pytest.fail("server did not become healthy within 120 s")
        denied = httpx.get(f"{base}/v1/models", timeout=10)
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        allowed = httpx.get(
            f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        assert allowed.status_code == 200 and allowed.json()["data"][0]["id"] == "tiny"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, output
    assert "Traceback" not in output and key not in output


# ---------------------------------------------------------------------------- make-tiny
def test_make_tiny_refuses_a_non_empty_directory(tmp_path, capsys):
    from ernie_cluster.cli.main import main

    target = tmp_path / "ck"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    assert main(["make-tiny", str(target)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is not empty" in line and "notes.txt" in line and "--force" in line
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert main(["make-tiny", str(target), "--force"]) == 0
    assert (target / "config.json").is_file() and (target / "notes.txt").is_file()
