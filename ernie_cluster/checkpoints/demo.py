"""The built-in demo checkpoint: made on first use, then reused from the user's cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ernie_cluster.checkpoints.make_tiny import make_tiny_checkpoint

DEMO_NAME = "demo-tiny-seed0-v1"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ernie-cluster"


def demo_checkpoint(root: Path | None = None) -> Path:
    """Path of the demo checkpoint (the `tiny` preset, seed 0), creating it if needed."""
    target = (root or cache_root()) / DEMO_NAME
    if (target / "model.safetensors.index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: build in a temporary sibling and rename, so two processes starting at once never
    # see a half-written checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=target.parent))
    try:
        make_tiny_checkpoint(staging, preset="tiny", seed=0)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model.safetensors.index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
