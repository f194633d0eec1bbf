"""Training determinism: the same seed and one thread give the same loss curve, step by step.

The fast test trains a narrow copy of the architecture on small batches; the slow one reruns
the first 50 steps of the shipped build and compares them with its recorded log."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from ernie_cluster.checkpoints.demo import demo_checkpoint as shipped_checkpoint
from ernie_cluster_tools.demo_model.architecture import demo_config
from ernie_cluster_tools.demo_model.pipeline import build_demo_tokenizer, chat_template
from ernie_cluster_tools.demo_model.trainer import TrainSettings, learning_rate_at, train

NARROW = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "head_dim": 8,
    "num_hidden_layers": 3,
}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def shipped_tokenizer() -> HFTokenizer:
    return HFTokenizer.from_file(str(shipped_checkpoint() / "tokenizer.json"))


def narrow_losses(seed: int) -> list[float]:
    tokenizer = shipped_tokenizer()
    config = demo_config(tokenizer.get_vocab_size(), NARROW)
    settings = TrainSettings(
        seed=seed, num_steps=50, warmup_steps=10, batch_size=2, max_length=320, num_threads=1
    )
    return train(config, tokenizer, chat_template(), settings).losses


def test_fifty_steps_repeat_exactly(one_thread):
    first = narrow_losses(seed=0)
    assert len(first) == 50
    assert narrow_losses(seed=0) == first
    assert narrow_losses(seed=1)[:5] != first[:5]
    assert sum(first[-10:]) < 0.8 * sum(first[:10])
    # training flushes denormals to zero (speed) but leaves the process as it found it
    assert (torch.tensor(torch.finfo(torch.float32).tiny) / 2).item() > 0.0


def test_learning_rate_schedule():
    settings = TrainSettings(num_steps=1000, warmup_steps=100, learning_rate=1e-3)
    rates = [learning_rate_at(step, settings) for step in range(1000)]
    assert rates[0] == pytest.approx(1e-5) and rates[99] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[100:]))
    assert rates[-1] >= settings.min_learning_rate
    with pytest.raises(ValueError, match="min_learning_rate"):
        TrainSettings(learning_rate=1e-4, min_learning_rate=1e-3)
    with pytest.raises(ValueError, match="stop_after"):
        train({}, shipped_tokenizer(), "", TrainSettings(), stop_after=0)


@pytest.mark.slow  # 50 steps of the real build on one thread: about a minute
def test_shipped_build_reproduces_its_first_fifty_steps(one_thread):
    log = json.loads((shipped_checkpoint() / "train_log.json").read_text())
    settings = TrainSettings(**{**log["settings"], "num_threads": 1})
    tokenizer = build_demo_tokenizer(log["vocab_size_requested"], settings.seed)
    assert tokenizer.to_str() == shipped_tokenizer().to_str()
    config = demo_config(tokenizer.get_vocab_size())
    first = train(config, tokenizer, chat_template(), settings, stop_after=50).losses
    assert len(first) == 50
    # NOTE: bit-equal only on the CPU the log was made on: another vendor's BLAS and oneDNN
    # kernels (AVX-512 on the Intel VM that built it, AVX2 on AMD) round some sums differently,
    # 1e-7 relative by step 6. Bit-exact determinism on one machine is
    # test_fifty_steps_repeat_exactly's to check; here the curve must be the same curve.
    assert first == pytest.approx(log["one_thread_losses"][:50], rel=1e-5, abs=0)
    # NOTE: the whole run used log["num_threads"] threads: float sums in another order, so
    # its curve is close to the one-thread curve, not bit-equal.
    assert first == pytest.approx(log["losses"][:50], rel=2e-3)
