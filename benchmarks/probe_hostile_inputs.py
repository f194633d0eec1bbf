"""The hostile-input probe of issue 20 against a live one-process server, as a table.

Starts `ernie-cluster serve --no-ray-serve` on the demo model (127.0.0.1, a free port), then
sends each hostile request of the probe while another client times /health and a small chat
request. Per row: the hostile request's status and time, and the medians of the two probes
under attack against their quiet medians (a ratio). The server's code is whatever
`ernie_cluster` the environment imports, so `PYTHONPATH=<old checkout>` gives the "before"
column on the same machine in the same session.

    .venv/bin/python benchmarks/probe_hostile_inputs.py [--out table.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx

from ernie_cluster.bench.server_process import ServerProcess

SMALL = {
    "model": "ernie-demo",
    "messages": [{"role": "user", "content": "Hello!"}],
    "max_tokens": 4,
    "temperature": 0,
}


def chat(**fields) -> dict:
    return {**SMALL, **fields}


def attacks() -> list[tuple[str, str, dict | bytes, int]]:
    """(name, path, body or raw request head, repeats)."""
    wide_tool = {
        "type": "function",
        "function": {
            "name": "wide",
            "parameters": {
                "type": "object",
                "properties": {f"field_{i}": {"type": "string"} for i in range(9_000)},
            },
        },
    }
    named = {"type": "function", "function": {"name": "wide"}}
    return [
        (
            "guided_choice of 300K choices (6 MB)",
            "/v1/chat/completions",
            chat(guided_choice=[f"option number {i}" for i in range(300_000)]),
            2,
        ),
        (
            "tool with 9,000 properties in tool_choice",
            "/v1/chat/completions",
            chat(tools=[wide_tool], tool_choice=named),
            2,
        ),
        (
            "256 x 4,000 token-id prompts",
            "/v1/completions",
            {
                "model": "ernie-demo",
                "prompt": [[5 + j % 300 for j in range(4_000)]] * 256,
                "max_tokens": 1,
            },
            1,
        ),
        (
            "100,000 stop strings, n=16",
            "/v1/chat/completions",
            chat(stop=[f"stop-{i}" for i in range(100_000)], n=16, max_tokens=16),
            2,
        ),
        ("n=128", "/v1/chat/completions", chat(n=128, max_tokens=64), 1),
        (
            "tool name with </tool_call>",
            "/v1/chat/completions",
            chat(tools=[{"type": "function", "function": {"name": "a</tool_call>"}}]),
            1,
        ),
        (
            "$ref to an external URI",
            "/v1/chat/completions",
            chat(
                response_format={
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {
                            "type": "object",
                            "properties": {"a": {"$ref": "https://example.com/x.json"}},
                        },
                    },
                }
            ),
            1,
        ),
        ("priority -100 from a client", "/v1/chat/completions", chat(priority=-100), 1),
        (
            "booleans as token ids",
            "/v1/completions",
            {"model": "ernie-demo", "prompt": [True, True], "max_tokens": 1},
            1,
        ),
        ("two 48 MB headers", "raw", b"", 1),
    ]


def send(base_url: str, port: int, path: str, body, repeats: int) -> tuple[list[int], float]:
    start = time.perf_counter()
    statuses = []
    for _ in range(repeats):
        if path == "raw":
            statuses.append(send_huge_headers(port, 48 << 20))
            continue
        data = json.dumps(body).encode()
        with httpx.Client(base_url=base_url, timeout=600) as http:
            response = http.post(path, content=data, headers={"content-type": "application/json"})
            statuses.append(response.status_code)
    return statuses, time.perf_counter() - start


def send_huge_headers(port: int, size: int) -> int:
    """Two headers of `size` bytes; the status the server answers (0: none)."""
    import select

    piece = b"a" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            for name in (b"X-A", b"X-B"):
                sock.sendall(name + b": ")
                for _ in range(size // len(piece)):
                    sock.sendall(piece)
                    if select.select([sock], [], [], 0)[0]:
                        raise ConnectionError
                sock.sendall(b"\r\n")
            sock.sendall(b"\r\n")
        except OSError:
            pass
        try:
            reply = sock.recv(64)
        except OSError:
            return 0
    return int(reply.split()[1]) if reply.startswith(b"HTTP/") else 0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def timed(http: httpx.Client, probe: str) -> tuple[float, int]:
    start = time.perf_counter()
    if probe == "health":
        status = http.get("/health").status_code
    else:
        status = http.post("/v1/chat/completions", json=SMALL).status_code
    return time.perf_counter() - start, status


def probe(server: ServerProcess) -> list[dict]:
    http = httpx.Client(base_url=server.base_url, timeout=600)
    quiet = {}
    for name in ("health", "small"):
        timed(http, name)
        quiet[name] = statistics.median(timed(http, name)[0] for _ in range(7))
    rows = []
    for name, path, body, repeats in attacks():
        rss_before = rss_mb(server.process.pid)
        result: dict = {}

        def attack(path=path, body=body, repeats=repeats, result=result) -> None:
            statuses, seconds = send(server.base_url, server.port, path, body, repeats)
            result.update(statuses=statuses, seconds=seconds)

        thread = threading.Thread(target=attack, daemon=True)
        thread.start()
        samples: dict[str, list[float]] = {"health": [], "small": []}
        probe_statuses = []
        while thread.is_alive() or len(samples["health"]) < 3:
            for kind in samples:
                seconds, status = timed(http, kind)
                samples[kind].append(seconds)
                probe_statuses.append(status)
        thread.join()
        rows.append(
            {
                "attack": name,
                "statuses": sorted(set(result["statuses"])),
                "attack_s": round(result["seconds"], 2),
                "health_ratio": round(statistics.median(samples["health"]) / quiet["health"], 1),
                "health_worst_s": round(max(samples["health"]), 3),
                "small_ratio": round(statistics.median(samples["small"]) / quiet["small"], 1),
                "probe_5xx": sum(s >= 500 for s in probe_statuses),
                "rss_growth_mb": round(rss_mb(server.process.pid) - rss_before, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    serve_args = [
        "--max-waiting-requests",
        "8",
        "--reasoning-parser",
        "ernie_x1",
        "--tool-call-parser",
        "ernie_x1",
        "--dtype",
        "float32",
    ]
    with ServerProcess(serve_args) as server:
        rows = probe(server)
    print(
        "| attack | statuses | attack time | /health median (x quiet) | /health worst | "
        "small chat median (x quiet) | 5xx to others | server RSS growth |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['attack']} | {r['statuses']} | {r['attack_s']} s | {r['health_ratio']}x | "
            f"{r['health_worst_s']} s | {r['small_ratio']}x | {r['probe_5xx']} | "
            f"{r['rss_growth_mb']} MB |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
