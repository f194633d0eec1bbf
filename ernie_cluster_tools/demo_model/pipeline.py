"""Building the demo checkpoint end to end: tokenizer, training, export.

Owns the order of the steps and the report of a build (time, losses, expert load). The
shipped checkpoint (`ernie_cluster/checkpoints/demo_checkpoint/`) is what `build_demo_model` wrote
with the default settings; `ernie-cluster train-demo` runs it again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ernie_cluster_tools.demo_model.architecture import demo_config
from ernie_cluster_tools.demo_model.conversations import generate_examples
from ernie_cluster_tools.demo_model.dataset import render_prompt
from ernie_cluster_tools.demo_model.export import save_checkpoint
from ernie_cluster_tools.demo_model.settings import TrainSettings
from ernie_cluster_tools.demo_model.tokenizer_builder import build_tokenizer
from ernie_cluster_tools.demo_model.trainer import TrainResult, train
from ernie_cluster_tools.fixtures.tiny_tokenizer import CHAT_TEMPLATE_FILE

logger = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 768
TOKENIZER_EXAMPLES = 8000
TRAIN_LOG = "train_log.json"
REFERENCE_STEPS = 50
"""Steps of the one-thread loss curve the log records, for reproducibility checks."""
# NOTE: sampling defaults of the demo: sharper than the real model's advice (1.0 / 0.95) so a
# request that sets no temperature still gets a clean answer from a 2M-parameter model.
DEMO_GENERATION = {"do_sample": True, "temperature": 0.3, "top_p": 0.9}


@dataclass
class BuildReport:
    directory: Path | None
    vocab_size: int
    num_parameters: int
    train_seconds: float
    total_seconds: float
    losses: list[float] = field(default_factory=list)
    one_thread_losses: list[float] = field(default_factory=list)
    """The first REFERENCE_STEPS steps again on one thread: bit-exact on any machine of the
    same kind, whatever thread count the build used."""
    num_tokens: int = 0
    expert_load: list[list[int]] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 50 steps (one step's loss depends on its batch)."""
        tail = self.losses[-50:]
        return sum(tail) / len(tail)


def chat_template() -> str:
    return CHAT_TEMPLATE_FILE.read_text("utf-8")


def build_demo_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0):
    """The BPE learned from `TOKENIZER_EXAMPLES` rendered training conversations."""
    template = chat_template()
    examples = generate_examples(TOKENIZER_EXAMPLES, seed=seed, split="train")
    return build_tokenizer([render_prompt(template, e) + e.target for e in examples], vocab_size)


def build_demo_model(
    directory: str | Path | None,
    settings: TrainSettings,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    dtype: str = "bfloat16",
    on_step=None,
) -> tuple[BuildReport, TrainResult]:
    """Tokenizer, training, then the checkpoint in `directory` (None: do not write one)."""
    start = time.perf_counter()
    tokenizer = build_demo_tokenizer(vocab_size, settings.seed)
    config = demo_config(tokenizer.get_vocab_size())
    logger.info(
        "tokenizer: %d ids; training %d steps", tokenizer.get_vocab_size(), settings.num_steps
    )
    result = train(config, tokenizer, chat_template(), settings, on_step)
    report = BuildReport(
        directory=None,
        vocab_size=tokenizer.get_vocab_size(),
        num_parameters=sum(p.numel() for p in result.model.parameters()),
        train_seconds=result.seconds,
        total_seconds=time.perf_counter() - start,
        losses=result.losses,
        num_tokens=result.num_tokens,
        expert_load=result.expert_load,
    )
    if directory is not None:
        report.directory = save_checkpoint(
            result.model, config, tokenizer, chat_template(), directory, dtype, DEMO_GENERATION
        )
        report.one_thread_losses = one_thread_curve(config, tokenizer, settings)
        write_train_log(report.directory / TRAIN_LOG, report, settings, vocab_size, dtype)
    return report, result


def one_thread_curve(config: dict, tokenizer, settings: TrainSettings) -> list[float]:
    """The losses of the first REFERENCE_STEPS steps of `settings` on one torch thread."""
    threads = torch.get_num_threads()
    try:
        one = replace(settings, num_threads=1)
        steps = min(REFERENCE_STEPS, settings.num_steps)
        return train(config, tokenizer, chat_template(), one, stop_after=steps).losses
    finally:
        torch.set_num_threads(threads)


def write_train_log(
    path: Path, report: BuildReport, settings: TrainSettings, vocab_size: int, dtype: str
) -> None:
    """What rebuilds the checkpoint (settings, requested vocabulary, dtype) and what the run
    measured: every step's loss, the time, the tokens, the expert load at the end."""
    settings_record = {k: v for k, v in asdict(settings).items() if k != "num_threads"}
    record = {
        "settings": settings_record,
        "num_threads": settings.num_threads,
        "vocab_size_requested": vocab_size,
        "vocab_size": report.vocab_size,
        "dtype": dtype,
        "num_parameters": report.num_parameters,
        "train_seconds": round(report.train_seconds, 1),
        "total_seconds": round(report.total_seconds, 1),
        "num_tokens": report.num_tokens,
        "final_loss": report.final_loss,
        "expert_load": report.expert_load,
        "losses": report.losses,
        "one_thread_losses": report.one_thread_losses,
    }
    path.write_text(json.dumps(record, indent=1) + "\n", "utf-8")
