"""Where a benchmark run writes its files: a label no earlier run in the folder has used, so a
second run beside the first keeps both (`serve_bench.json`, then `serve_bench-2.json`)."""

from __future__ import annotations

from pathlib import Path


def fresh_label(out_dir: Path, label: str, suffixes: tuple[str, ...]) -> str:
    """`label`, or `label-2`, `label-3`, ... : the first for which no `<label><suffix>` exists
    in `out_dir` (suffixes such as ".json", "_latency.png")."""
    candidate, number = label, 1
    while any((out_dir / f"{candidate}{suffix}").exists() for suffix in suffixes):
        number += 1
        candidate = f"{label}-{number}"
    return candidate
