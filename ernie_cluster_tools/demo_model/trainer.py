"""Training the demo model: transformers' Ernie4_5_MoeForCausalLM in train mode, on CPU.

Owns the optimisation loop: AdamW with warm-up and cosine decay, gradient clipping, and the
auxiliary-loss-free expert balancing ERNIE uses (after each step, each MoE layer's router
correction bias moves toward under-used experts). It never writes files (see export.py).
Deterministic: the same settings and torch thread count give the same loss curve, step by step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from ernie_cluster_tools.demo_model.architecture import hf_config
from ernie_cluster_tools.demo_model.attention_supervision import AttentionSupervision
from ernie_cluster_tools.demo_model.dataset import Batch, batch_stream
from ernie_cluster_tools.demo_model.settings import TrainSettings
from ernie_cluster_tools.demo_model.tokenizer_builder import word_pieces

logger = logging.getLogger(__name__)

EXPERT_LOAD_STEPS = 50


@dataclass
class TrainResult:
    model: torch.nn.Module
    losses: list[float] = field(default_factory=list)
    """Mean loss per target token, one value per step."""
    seconds: float = 0.0
    num_tokens: int = 0
    """Tokens fed through the model (prompts and padding included)."""
    expert_load: list[list[int]] = field(default_factory=list)
    """Tokens routed to each expert of each MoE layer over the last EXPERT_LOAD_STEPS steps."""


def learning_rate_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to min_learning_rate at the last step."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    span = max(1, settings.num_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return (
        settings.min_learning_rate + (settings.learning_rate - settings.min_learning_rate) * cosine
    )


def init_model(config: dict, seed: int) -> torch.nn.Module:
    from transformers import Ernie4_5_MoeForCausalLM

    torch.manual_seed(seed)
    model = Ernie4_5_MoeForCausalLM(hf_config(config)).float()
    return model.train()


def train(
    config: dict,
    tokenizer: Tokenizer,
    chat_template: str,
    settings: TrainSettings,
    on_step: Callable[[int, float], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a fresh model of `config` on demo conversations; `on_step(step, loss)` after each.

    `stop_after` ends the run early, on the same schedule: the first steps of a full run.
    """
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1, got {stop_after}")
    if settings.num_threads is not None:
        torch.set_num_threads(settings.num_threads)
    with _denormals_flushed():
        return _train(config, tokenizer, chat_template, settings, on_step, stop_after)


@contextmanager
def _denormals_flushed() -> Iterator[None]:
    """Flush denormal floats to zero while training, then restore the thread's setting.

    Without it, steps got 3x slower after about 50 steps as tiny values in the optimizer
    state and gradients became denormal floats (slow paths on x86). The flag is processor
    state, so it must not outlive training: other code in the process (hypothesis, for one)
    relies on IEEE denormals.
    """
    before = _flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def _flushing_denormals() -> bool:
    smallest_normal = torch.finfo(torch.float32).tiny
    return (torch.tensor(smallest_normal) / 2).item() == 0.0


def _train(
    config: dict,
    tokenizer: Tokenizer,
    chat_template: str,
    settings: TrainSettings,
    on_step: Callable[[int, float], None] | None,
    stop_after: int | None,
) -> TrainResult:
    model = init_model(config, settings.seed)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.learning_rate,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    routers = _routers(model)
    load = _ExpertLoad(routers)
    supervision = AttentionSupervision(model) if settings.attention_supervision else None
    batches = batch_stream(
        tokenizer,
        chat_template,
        settings.seed,
        settings.batch_size,
        settings.max_length,
        name_pieces=word_pieces(tokenizer),
    )
    result = TrainResult(model)
    start = time.perf_counter()
    try:
        for step in range(min(settings.num_steps, stop_after or settings.num_steps)):
            batch = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, settings)
            loss = _step(model, optimizer, batch, settings, supervision)
            counts = load.take(batch.attention_mask)  # [moe_layers, experts]
            _balance(routers, counts, settings.bias_update_rate)
            result.losses.append(loss)
            result.num_tokens += batch.input_ids.numel()
            if step >= settings.num_steps - EXPERT_LOAD_STEPS:
                load.accumulate(counts)
            if on_step is not None:
                on_step(step, loss)
    finally:
        load.close()
        if supervision is not None:
            supervision.close()
    result.seconds = time.perf_counter() - start
    result.expert_load = load.total.tolist()
    model.eval()
    return result


def _step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    settings: TrainSettings,
    supervision: AttentionSupervision | None,
) -> float:
    """One optimizer step; returns the language-model loss (the supervision term excluded)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    total = out.loss
    if supervision is not None:
        aux = supervision.loss(batch.input_ids, batch.labels, batch.attention_mask)
        total = total + settings.attention_supervision * aux
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
    optimizer.step()
    return out.loss.item()


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


class _ExpertLoad:
    """Counts, per MoE layer, the real (non-padding) tokens routed to each expert."""

    def __init__(self, routers: list[torch.nn.Module]) -> None:
        self.num_experts = routers[0].num_experts if routers else 0
        self._chosen: list[torch.Tensor] = [torch.empty(0)] * len(routers)
        self._hooks = [
            router.register_forward_hook(self._hook(i)) for i, router in enumerate(routers)
        ]
        self.total = torch.zeros(len(routers), self.num_experts, dtype=torch.long)

    def _hook(self, index: int):
        def save(module, inputs, output) -> None:
            self._chosen[index] = output[2].detach()  # [B*T, k] chosen experts

        return save

    def take(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """[moe_layers, experts] counts of the last forward's real tokens."""
        real = attention_mask.reshape(-1).bool()  # [B*T]
        counts = [
            torch.bincount(chosen[real].reshape(-1), minlength=self.num_experts)
            for chosen in self._chosen
        ]
        return torch.stack(counts) if counts else self.total.clone()

    def accumulate(self, counts: torch.Tensor) -> None:
        self.total += counts

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


@torch.no_grad()
def _balance(routers: list[torch.nn.Module], counts: torch.Tensor, rate: float) -> None:
    """Raise the correction bias of experts below the mean load, lower it above."""
    if rate == 0:
        return
    for router, layer_counts in zip(routers, counts, strict=True):
        mean = layer_counts.float().mean()
        step = torch.sign(mean - layer_counts.float()) * rate  # [E]
        router.moe_statics.e_score_correction_bias += step.unsqueeze(0)
