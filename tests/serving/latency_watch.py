"""LatencyWatch: is the server still quick for everyone else while one client attacks it?

Times /health and a small generation request on a quiet server, then again while an attack
runs in other threads, and checks each median against its own quiet median (a generous ratio:
the failures this guards against stalled the loop for seconds to minutes). No absolute times.

NOTE: the server runs in a thread of the test process, so the attack's client threads and the
test process's garbage collector share its GIL; late in a full suite run a huge-body test
measured 27x (74 ms against 2.7 ms quiet) with nothing wrong, where alone it measures 1-3x.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

RATIO_BOUND = 50.0
"""How much slower than quiet a probe may be under attack (medians)."""
QUIET_SAMPLES = 7
MAX_ATTACK_SAMPLES = 40


@dataclass
class LatencyWatch:
    client: httpx.Client
    small: tuple[str, dict[str, Any]]
    """(path, body) of the small request whose latency is watched."""
    quiet: dict[str, float] = field(default_factory=dict)

    def probes(self) -> dict[str, Callable[[], int]]:
        path, body = self.small
        return {
            "health": lambda: self.client.get("/health").status_code,
            "small": lambda: self.client.post(path, json=body).status_code,
        }

    def measure_quiet(self) -> dict[str, float]:
        for name, probe in self.probes().items():
            probe()  # warm: first-request costs are not the baseline
            self.quiet[name] = statistics.median(_timed(probe) for _ in range(QUIET_SAMPLES))
        return self.quiet

    def during(self, attack: Callable[[], Any], min_samples: int = 3) -> Any:
        """Run `attack` in a thread; probe meanwhile; assert every probe answered 200 within
        RATIO_BOUND x its quiet median. Returns what `attack` returned."""
        if not self.quiet:
            self.measure_quiet()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["result"] = attack()
            except BaseException as exc:  # re-raised in the test thread
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        samples: dict[str, list[float]] = {name: [] for name in self.probes()}
        statuses: list[int] = []
        while len(samples["health"]) < MAX_ATTACK_SAMPLES:
            if not thread.is_alive() and len(samples["health"]) >= min_samples:
                break
            for name, probe in self.probes().items():
                start = time.perf_counter()
                statuses.append(probe())
                samples[name].append(time.perf_counter() - start)
        thread.join(timeout=300)
        assert not thread.is_alive(), "the attack did not finish"
        if "error" in outcome:
            raise outcome["error"]
        assert set(statuses) == {200}, statuses
        for name, times in samples.items():
            ratio = statistics.median(times) / self.quiet[name]
            assert ratio < RATIO_BOUND, (
                f"{name}: median {statistics.median(times) * 1e3:.1f} ms under attack, "
                f"{self.quiet[name] * 1e3:.1f} ms quiet ({ratio:.1f}x)"
            )
        return outcome.get("result")


def _timed(probe: Callable[[], int]) -> float:
    start = time.perf_counter()
    assert probe() == 200
    return time.perf_counter() - start
