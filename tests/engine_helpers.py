"""Helpers shared by the engine tests: prompt sets and block-leak checks."""

from __future__ import annotations

import random


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


def assert_no_leaks(engine) -> None:
    kv = engine.kv_cache
    assert not engine.has_unfinished_requests()
    assert kv.num_free_blocks == kv.num_blocks, (
        f"{kv.num_blocks - kv.num_free_blocks} KV blocks still in use"
    )
