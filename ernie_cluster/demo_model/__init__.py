"""The demo model: a small ernie4_5_moe checkpoint trained on CPU to think, answer and call
tools, shipped inside the package (`checkpoint/`) and served by scripts/demo.sh.

Submodules: lexicon, phrasings and tool_schemas (the words), conversations (the data),
tokenizer_builder, dataset, architecture, trainer, export, pipeline (the build) and evaluate
(held-out scores).
Importing this package loads neither torch nor transformers.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
SERVED_NAME = "ernie-demo"


def shipped_checkpoint() -> Path:
    """Directory of the checkpoint that ships with the package."""
    if not (CHECKPOINT_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo checkpoint is missing from {CHECKPOINT_DIR}; rebuild it with "
            f"`ernie-cluster train-demo {CHECKPOINT_DIR}`"
        )
    return CHECKPOINT_DIR
