"""Helpers shared by the engine tests: the reference greedy decoder and block-leak checks."""

from __future__ import annotations

import random

import torch


def random_prompts(count: int, vocab: int, seed: int, lengths=(1, 300), shared_prefix=64):
    """Token-id prompts; every third one starts with a shared prefix (prefix-cache hits)."""
    rng = random.Random(seed)
    base = [rng.randrange(3, vocab) for _ in range(shared_prefix)]
    prompts = []
    for i in range(count):
        n = rng.randint(*lengths) if i else lengths[0]
        body = [rng.randrange(3, vocab) for _ in range(n)]
        if i % 3 == 2 and n > shared_prefix:
            body[:shared_prefix] = base
        prompts.append(body)
    prompts[-1] = prompts[-1][: lengths[1]] + [7] * max(0, lengths[1] - len(prompts[-1]))
    return prompts


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def assert_no_leaks(engine) -> None:
    kv = engine.kv_cache
    assert not engine.has_unfinished_requests()
    assert kv.num_free_blocks == kv.num_blocks, (
        f"{kv.num_blocks - kv.num_free_blocks} KV blocks still in use"
    )
