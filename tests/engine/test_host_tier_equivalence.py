"""With the host KV tier on, greedy tokens and logprobs are transformers' (and the tier-off
run's) under KV pressure that forces evictions, host hits, partial host hits and swaps after
preemption, at W = 1 and at TP2/EP2 over Ray; the counters prove each of those happened.

Returning sessions: four conversations take turns on a device pool that holds about two, so
a session's earlier turns are evicted (written to the host) before it returns; at the end two
sessions alternate, so one returns with its prefix on the device and its tail on the host
(a partial host hit; the block counts depend only on the lengths). Preemption:
four long generations share the same small pool, so requests are preempted and come back
from the host instead of recomputing.
"""

from __future__ import annotations

import random

import pytest
import torch
from engine_helpers import assert_no_leaks
from hf_reference import hf_greedy, save_hf_checkpoint

from ernie_cluster import LLM, SamplingParams

NUM_KV_BLOCKS = 28  # 448 tokens: about two sessions' turns
SESSION_LEN, TURN_LEN = 150, 24
ORDER = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0, 1]  # which session sends its next turn
GEN_TOKENS = 8
PREEMPT_PROMPTS, PREEMPT_GEN = 4, 56


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    overrides = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    return save_hf_checkpoint(tmp_path_factory.mktemp("host_tier"), seed=5, **overrides)


def _logprob_rows(hf, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The scenario's prompts with transformers' greedy tokens and logprob rows."""
    from transformers import Ernie4_5_MoeForCausalLM

    hf = Ernie4_5_MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    vocab = hf.config.vocab_size
    rng = random.Random(3)
    histories = [[rng.randrange(3, vocab) for _ in range(SESSION_LEN)] for _ in range(4)]
    turns = []  # (prompt, tokens, logprob rows) in the order they are sent
    for session in ORDER:
        history = histories[session]
        tokens = hf_greedy(hf, history, GEN_TOKENS)
        turns.append((list(history), tokens, _logprob_rows(hf, history, tokens)))
        history += tokens + [rng.randrange(3, vocab) for _ in range(TURN_LEN)]
    batch = []
    for _ in range(PREEMPT_PROMPTS):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(60, 90))]
        tokens = hf_greedy(hf, prompt, PREEMPT_GEN)
        batch.append((prompt, tokens, _logprob_rows(hf, prompt, tokens)))
    return turns, batch


def _check(outputs, expected) -> list[list[dict[int, float]]]:
    logprobs = []
    for i, (out, (_prompt, tokens, rows)) in enumerate(zip(outputs, expected, strict=True)):
        sample = out.outputs[0]
        assert sample.token_ids == tokens, f"request {i}"
        for step, entry in enumerate(sample.logprobs):
            for token, value in entry.items():
                assert abs(value - rows[step, token].item()) < 1e-4, (i, step, token)
        logprobs.append(sample.logprobs)
    return logprobs


def run_scenario(checkpoint, reference, world: int, preempt: bool = True, **tier):
    """Sessions turn by turn, then the preempting batch; returns per-turn stat deltas."""
    turns, batch = reference
    greedy = SamplingParams(temperature=0, max_tokens=GEN_TOKENS, ignore_eos=True, logprobs=2)
    with LLM(
        model=str(checkpoint),
        dtype="float32",
        show_progress=False,
        tensor_parallel_size=world,
        expert_parallel_size=world,
        num_kv_blocks=NUM_KV_BLOCKS,
        max_num_batched_tokens=128,
        **tier,
    ) as llm:
        deltas, outputs = [], []
        for prompt, _tokens, _rows in turns:
            before = llm.get_stats()
            outputs.append(llm.generate([prompt], greedy)[0])
            after = llm.get_stats()
            deltas.append(
                (
                    after.prefix_cache_hits - before.prefix_cache_hits,
                    after.host_kv_hit_tokens - before.host_kv_hit_tokens,
                )
            )
        session_logprobs = _check(outputs, turns)
        batch_logprobs = []
        if preempt:
            long = SamplingParams(
                temperature=0, max_tokens=PREEMPT_GEN, ignore_eos=True, logprobs=2
            )
            batch_outputs = llm.generate([prompt for prompt, _, _ in batch], long)
            batch_logprobs = _check(batch_outputs, batch)
        stats = llm.get_stats()
        assert_no_leaks(llm.engine)
    return deltas, stats, session_logprobs + batch_logprobs


def _assert_the_tier_worked(deltas, stats) -> None:
    returning = deltas[4:]  # the sessions' later turns
    assert any(device == 0 and host > 0 for device, host in returning), deltas  # host only
    assert any(device > 0 and host > 0 for device, host in returning), deltas  # partial
    assert stats.num_preemptions > 0
    assert stats.host_kv_swapped_in_tokens > 0  # preempted requests came back by copy
    assert stats.host_kv_blocks_saved > 0 and stats.host_kv_blocks_loaded > 0
    assert stats.host_kv_bytes_moved > 0


@pytest.fixture(scope="module")
def tier_off(checkpoint, reference):
    _deltas, stats, logprobs = run_scenario(checkpoint, reference, 1)
    assert stats.host_kv_hit_tokens == 0 and stats.num_preemptions > 0
    return logprobs


def test_w1_host_tier_matches_transformers_and_tier_off(checkpoint, reference, tier_off):
    deltas, stats, logprobs = run_scenario(checkpoint, reference, 1, num_host_kv_blocks=256)
    _assert_the_tier_worked(deltas, stats)
    assert stats.host_kv_blocks_dropped == 0
    for on, off in zip(logprobs, tier_off, strict=True):
        for a, b in zip(on, off, strict=True):
            assert a.keys() == b.keys()
            assert all(abs(a[t] - b[t]) < 1e-4 for t in a)


def test_w1_a_full_host_tier_evicts_and_still_answers_exactly(checkpoint, reference):
    """A 12-block host tier overflows: it drops its LRU blocks; sessions whose blocks were
    dropped while they were away recompute them, and every answer is still transformers'."""
    deltas, stats, _ = run_scenario(checkpoint, reference, 1, preempt=False, num_host_kv_blocks=12)
    assert stats.host_kv_blocks_dropped > 0
    assert stats.host_kv_blocks_used == 12
    assert stats.host_kv_hit_tokens > 0  # some came back by copy ...
    assert (0, 0) in deltas[4:]  # ... and some returning turn found nothing and recomputed


@pytest.mark.slow
def test_tp2_ep2_host_tier_matches_transformers(checkpoint, reference, ray_cluster):
    deltas, stats, _ = run_scenario(checkpoint, reference, 2, num_host_kv_blocks=256)
    _assert_the_tier_worked(deltas, stats)
