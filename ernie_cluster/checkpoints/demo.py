"""The built-in demo checkpoint: what runs when no `--model` is given.

It is the trained demo model that ships inside the package (see ernie_cluster.demo_model):
small enough for a laptop CPU, and it really thinks, answers and calls tools. Random
checkpoints for tests come from `make-tiny` instead.
"""

from __future__ import annotations

from pathlib import Path


def demo_checkpoint() -> Path:
    """Directory of the shipped demo checkpoint (nothing is downloaded or generated)."""
    from ernie_cluster.demo_model import shipped_checkpoint

    return shipped_checkpoint()
