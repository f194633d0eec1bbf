"""The built-in demo checkpoint: what runs when no `--model` is given.

It is the trained demo model that ships inside the package as data (`demo_checkpoint/`):
small enough for a laptop CPU, and it really thinks, answers and calls tools. The code that
trained it lives in `ernie_cluster_tools.demo_model` (`ernie-cluster train-demo`); random
checkpoints for tests come from `make-tiny`. Nothing here imports either.
"""

from __future__ import annotations

from pathlib import Path

DEMO_CHECKPOINT_DIR = Path(__file__).resolve().parent / "demo_checkpoint"
DEMO_SERVED_NAME = "ernie-demo"
"""The model name the demo is served under when no `--served-model-name` is given."""


def demo_checkpoint() -> Path:
    """Directory of the shipped demo checkpoint (nothing is downloaded or generated)."""
    if not (DEMO_CHECKPOINT_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo checkpoint is missing from {DEMO_CHECKPOINT_DIR}; rebuild it with "
            f"`ernie-cluster train-demo {DEMO_CHECKPOINT_DIR}`"
        )
    return DEMO_CHECKPOINT_DIR
