"""Helpers shared by the benchmark scripts: cached checkpoints, timing, machine notes.

Random checkpoints are written once into `benchmarks/out/` (gitignored) and reused. Timing is
wall clock (`time.perf_counter`). `interleave` alternates the contenders in ABBA order so a
slow spell of a shared machine hits both alike, and `BackgroundLoad` reports how much CPU
other processes took meanwhile. Imported by the scripts beside it, never by the package.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

OUT_DIR = Path(__file__).resolve().parent / "out"
FIRST_NORMAL_TOKEN_ID = 3
"""Random prompts draw ids from [3, vocab): 0-2 are pad, bos and eos."""


def checkpoint(preset: str = "mini", seed: int = 0) -> Path:
    """The random `preset` checkpoint for `seed`, written on first use into OUT_DIR.

    The directory name carries a digest of the generator's source, so a change to how
    checkpoints are made gives a new checkpoint instead of silently reusing a stale one.
    """
    from ernie_cluster_tools.fixtures import make_tiny, presets, tiny_tokenizer

    digest = hashlib.sha256()
    for module in (make_tiny, presets, tiny_tokenizer):
        digest.update(Path(module.__file__).read_bytes())
    path = OUT_DIR / f"{preset}-seed{seed}-{digest.hexdigest()[:10]}"
    if not (path / "config.json").is_file():
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        # NOTE: written beside and renamed, so an interrupted run never leaves half a checkpoint.
        staging = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=OUT_DIR))
        try:
            make_tiny.make_tiny_checkpoint(staging, preset=preset, seed=seed)
            staging.rename(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def load_hf_model(path: Path) -> torch.nn.Module:
    """transformers' Ernie4_5_MoeForCausalLM in float32, eval mode."""
    from transformers import Ernie4_5_MoeForCausalLM

    return Ernie4_5_MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine, 2 threads stall "
        "whenever another process holds a core and the timings swing by 10x)",
    )


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def machine_summary() -> str:
    """One line naming the CPU, core count, torch (and transformers) versions and threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores", f"torch {torch.__version__}"]
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    parts.append(f"threads {torch.get_num_threads()}")
    return "; ".join(parts)


def code_version() -> str:
    """Commit of the `ernie_cluster` being measured, flagged when its files differ from it."""
    import ernie_cluster

    package = Path(ernie_cluster.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(package), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{package} (not a git checkout)"
    return f"{commit}{' + uncommitted changes' if dirty else ''} ({package})"


def greedy_step(
    model: torch.nn.Module,
    token_ids: list[int],
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
) -> tuple[list[int], float]:
    """One flat batch through our model: each sequence's last `query_lens[i]` tokens of a
    context of `context_lens[i]`, KV in its bound paged cache. Returns the greedy next token
    of every sequence and the seconds spent building the AttentionMetadata."""
    from ernie_cluster.attention import AttentionMetadata

    start = time.perf_counter()
    pairs = zip(query_lens, context_lens, strict=True)
    positions = [p for q_len, ctx in pairs for p in range(ctx - q_len, ctx)]
    meta = AttentionMetadata.build(query_lens, context_lens, block_tables, block_size)
    metadata_seconds = time.perf_counter() - start
    hidden = model(torch.tensor(token_ids), torch.tensor(positions), meta)  # [N, H]
    last_rows = torch.tensor(query_lens).cumsum(0) - 1  # [B]
    next_ids = model.compute_logits(hidden, last_rows).argmax(-1).tolist()
    return next_ids, metadata_seconds


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_NORMAL_TOKEN_ID, vocab_size) for _ in range(length)]


def interleave(
    contenders: dict[str, Callable[[], float]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run each contender `warmup` times untimed, then `repeats` times in ABBA order.

    A contender does its own untimed setup and returns the seconds of its timed part.
    """
    for _ in range(warmup):
        for run in contenders.values():
            run()
    names = list(contenders)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else reversed(names):
            seconds[name].append(contenders[name]())
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """'min..max' of a list of rates or times, for judging the noise."""
    return f"{min(values):.1f}..{max(values):.1f}"


def _busy_seconds() -> float | None:
    """CPU seconds all processes of the machine spent busy since boot (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


class BackgroundLoad:
    """Context manager: average cores used by OTHER processes while the block ran.

    Other processes on a shared machine (other sessions' tests) slow a benchmark down
    unevenly; a figure taken while this is well above 0 is suspect.
    """

    def __enter__(self) -> BackgroundLoad:
        self._busy = _busy_seconds()
        self._own = time.process_time()
        self._wall = time.perf_counter()
        self.cores: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _busy_seconds()
        if busy is None or self._busy is None:
            return
        wall = time.perf_counter() - self._wall
        others = (busy - self._busy) - (time.process_time() - self._own)
        self.cores = max(0.0, others / wall) if wall > 0 else 0.0

    def describe(self) -> str:
        if self.cores is None:
            return "background load: unknown (no /proc/stat)"
        return f"background load from other processes: {self.cores:.2f} cores on average"
