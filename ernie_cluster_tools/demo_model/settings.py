"""The settings of a demo-model training run, validated on construction.

Apart from trainer.py so that `ernie-cluster train-demo`'s flags (whose defaults come from
here) are registered without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainSettings:
    seed: int = 0
    num_steps: int = 1600
    """Optimizer steps; each sees `batch_size` fresh conversations."""
    batch_size: int = 16
    learning_rate: float = 2e-3
    min_learning_rate: float = 2e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_length: int = 768
    """Conversations longer than this many tokens are skipped."""
    bias_update_rate: float = 1e-3
    """Step of the router correction bias toward balanced expert load (0 turns it off)."""
    attention_supervision: float = 0.5
    """Weight of the copy-head attention loss (attention_supervision.py); 0 turns it off."""
    num_threads: int | None = None
    """torch threads (None: leave torch's setting)."""

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"num_steps ({self.num_steps}) and batch_size ({self.batch_size}) must be >= 1"
            )
        if not 0 < self.min_learning_rate <= self.learning_rate:
            raise ValueError(
                f"need 0 < min_learning_rate ({self.min_learning_rate}) <= learning_rate "
                f"({self.learning_rate})"
            )
