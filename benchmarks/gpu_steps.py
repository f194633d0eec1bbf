"""Hand-built SchedulerOutputs for benchmarks that drive a ModelRunner directly: decode steps
at a given context without prefilling it, and a prompt prefilled chunk by chunk.

What the scheduler would send, minus the scheduling: blocks come from a counter over the pool
(no prefix cache, no eviction), and past the pool's end the ids wrap around, so requests may
share physical blocks (callers report it). Imported by the scripts beside it, never by the
package.
"""

from __future__ import annotations

import torch

FIRST_TOKEN_ID = 3  # ids 0-2 are pad, bos and eos


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockAllocator:
    """Hands out block ids in order; past the pool's end they wrap around (aliasing)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.next = 0

    def take(self, count: int) -> list[int]:
        count = max(0, count)
        ids = [(self.next + i) % self.num_blocks for i in range(count)]
        self.next += count
        return ids

    @property
    def aliased(self) -> bool:
        return self.next > self.num_blocks


def random_prompt(seed: int, length: int, vocab: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN_ID, vocab, (length,), generator=generator).tolist()


def decode_outputs(req_ids, contexts, num_steps, num_blocks, block_size, vocab, seed):
    """SchedulerOutputs of `num_steps` decode steps: the requests arrive with all but the last
    token of their context computed, then advance one token a step as diffs."""
    from ernie_cluster.sampling_params import SamplingParams
    from ernie_cluster.step_io import (
        CachedRequestData,
        NewRequestData,
        SchedulerOutput,
    )

    params = SamplingParams(temperature=0.0, max_tokens=num_steps + 1, ignore_eos=True)
    blocks = BlockAllocator(num_blocks)
    tables = [blocks.take(blocks_for(ctx, block_size)) for ctx in contexts]
    arrivals = [
        NewRequestData(
            req_id=req_id,
            prompt_token_ids=random_prompt(seed + i, ctx, vocab),
            params=params,
            stop_token_ids=[],
            sample_index=0,
            block_ids=list(table),
            num_computed_tokens=ctx - 1,
        )
        for i, (req_id, ctx, table) in enumerate(zip(req_ids, contexts, tables, strict=True))
    ]
    one_each = dict.fromkeys(req_ids, 1)
    outputs = [SchedulerOutput(new_requests=arrivals, num_scheduled_tokens=one_each)]
    for step in range(1, num_steps):
        diffs = []
        for req_id, ctx, table in zip(req_ids, contexts, tables, strict=True):
            computed = ctx - 1 + step
            new_blocks = blocks.take(blocks_for(computed + 1, block_size) - len(table))
            table.extend(new_blocks)
            diffs.append(CachedRequestData(req_id, new_blocks, computed))
        outputs.append(SchedulerOutput(cached_requests=diffs, num_scheduled_tokens=one_each))
    return outputs, blocks.aliased


def prefill_outputs(req_id, prompt_len, chunk, num_blocks, block_size, vocab, seed):
    """SchedulerOutputs of one prompt prefilled `chunk` tokens a step."""
    from ernie_cluster.sampling_params import SamplingParams
    from ernie_cluster.step_io import (
        CachedRequestData,
        NewRequestData,
        SchedulerOutput,
    )

    blocks = BlockAllocator(num_blocks)
    first = min(chunk, prompt_len)
    arrival = NewRequestData(
        req_id=req_id,
        prompt_token_ids=random_prompt(seed, prompt_len, vocab),
        params=SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
        stop_token_ids=[],
        sample_index=0,
        block_ids=blocks.take(blocks_for(prompt_len, block_size)),
        num_computed_tokens=0,
    )
    outputs = [SchedulerOutput(new_requests=[arrival], num_scheduled_tokens={req_id: first})]
    for done in range(first, prompt_len, chunk):
        step = {req_id: min(chunk, prompt_len - done)}
        diff = CachedRequestData(req_id, [], done)
        outputs.append(SchedulerOutput(cached_requests=[diff], num_scheduled_tokens=step))
    return outputs, blocks.aliased
