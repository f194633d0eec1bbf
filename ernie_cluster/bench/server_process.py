"""An OpenAI-compatible server in a child process, for benchmarks and tests that need a live
endpoint without Ray: ours (`ernie-cluster serve --no-ray-serve`) or a peer's command line,
started on 127.0.0.1 at a free port, awaited with a bound, and always stopped (terminate,
then kill)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ernie_cluster.bench.client import wait_until_serving
from ernie_cluster.distributed.process_group import free_port

HOST = "127.0.0.1"


def ours(serve_args: list[str]) -> Callable[[str, int], list[str]]:
    """The command line of our one-process server with extra `serve` flags."""

    def command(host: str, port: int) -> list[str]:
        base = [sys.executable, "-m", "ernie_cluster.cli.main", "serve", "--no-ray-serve"]
        return [*base, "--host", host, "--port", str(port), *serve_args]

    return command


class ServerProcess:
    """`with ServerProcess(["--model", path]) as server: server.base_url ...`; a callable
    (host, port) -> argv runs another server instead."""

    def __init__(
        self,
        serve_args: list[str] | Callable[[str, int], list[str]],
        start_timeout_s: float = 120.0,
        attempts: int = 3,
    ) -> None:
        self.command = serve_args if callable(serve_args) else ours(list(serve_args))
        self.start_timeout_s = start_timeout_s
        self.attempts = attempts
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> ServerProcess:
        # NOTE: another process may take the free port before the server binds it; retry.
        for attempt in range(1, self.attempts + 1):
            try:
                started = self._start()
            except BaseException:  # Ctrl-C while it starts: the child must not outlive us
                self.stop()
                raise
            if started:
                return self
            self.stop()
            if attempt == self.attempts:
                raise RuntimeError(
                    f"the server did not come up in {self.start_timeout_s:.0f} s; its log:\n"
                    + self.log_tail()
                )
        raise AssertionError("unreachable")

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        if exc_type is None and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)  # kept for a post-mortem only on failure

    def _start(self) -> bool:
        self.port = free_port(HOST)
        fd, name = tempfile.mkstemp(prefix="ernie-server-", suffix=".log")
        self.log_path = Path(name)
        with open(fd, "wb") as log:
            self.process = subprocess.Popen(
                self.command(HOST, self.port), stdout=log, stderr=subprocess.STDOUT
            )
        problem = wait_until_serving(
            self.base_url,
            None,
            self.start_timeout_s,
            alive=lambda: self.process.poll() is None,
            period_s=0.25,
        )
        return problem is None

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout_s)

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]
