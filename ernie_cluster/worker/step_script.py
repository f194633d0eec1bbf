"""Scripted engine steps for driving a ModelRunner without a scheduler (tests, benchmarks).

`StepScript` hands each request a fixed run of KV blocks and builds the SchedulerOutput of
a step from {request: tokens to compute}; it learns sampled tokens from each step's output.
A step may mix decodes, fresh prompts and prefill chunks.
"""

from __future__ import annotations

from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.step_io import CachedRequestData, NewRequestData, SchedulerOutput

BLOCK_SIZE = 4
BLOCKS_PER_REQUEST = 16  # 64 tokens each


def prompt(seed: int, length: int, vocab: int = 500) -> list[int]:
    return [(7 * seed + 13 * j) % (vocab - 3) + 3 for j in range(length)]


class StepScript:
    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params or SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
        self.prompts: dict[str, list[int]] = {}
        self.blocks: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.sent: set[str] = set()
        self.sampled: dict[str, list[int]] = {}

    def add(self, req_id: str, tokens: list[int]) -> None:
        first = len(self.blocks) * BLOCKS_PER_REQUEST
        self.prompts[req_id] = list(tokens)
        self.blocks[req_id] = list(range(first, first + BLOCKS_PER_REQUEST))
        self.computed[req_id] = 0
        self.sampled[req_id] = []

    def step(self, scheduled: dict[str, int]) -> SchedulerOutput:
        """A step computing `scheduled[r]` tokens of each request (1 = a decode)."""
        out = SchedulerOutput(num_scheduled_tokens=dict(scheduled))
        for req_id, count in scheduled.items():
            if req_id not in self.sent:
                self.sent.add(req_id)
                out.new_requests.append(
                    NewRequestData(
                        req_id=req_id,
                        prompt_token_ids=self.prompts[req_id],
                        params=self.params,
                        stop_token_ids=[],
                        sample_index=0,
                        block_ids=self.blocks[req_id],
                        num_computed_tokens=0,
                    )
                )
            else:
                out.cached_requests.append(CachedRequestData(req_id, [], self.computed[req_id]))
            self.computed[req_id] += count
        return out

    def record(self, output) -> None:
        for req_id, tokens in output.sampled_token_ids.items():
            self.sampled[req_id].extend(tokens)

    def decodes(self, req_ids: list[str]) -> dict[str, int]:
        return {r: 1 for r in req_ids}


def mixed_script() -> tuple[StepScript, list[dict[str, int]]]:
    """Steps: a 2-prompt prefill, decodes, a mixed step (decodes + a fresh prompt + the first
    chunk of another), then the chunk's rest with decodes, then decodes of all four."""
    script = StepScript()
    script.add("a", prompt(1, 7))
    script.add("b", prompt(2, 11))
    script.add("c", prompt(3, 5))
    script.add("d", prompt(4, 13))
    steps = [
        {"a": 7, "b": 11},
        {"a": 1, "b": 1},
        {"a": 1, "b": 1, "c": 5, "d": 6},
        {"a": 1, "b": 1, "c": 1, "d": 7},
        {"a": 1, "b": 1, "c": 1, "d": 1},
        {"a": 1, "b": 1, "c": 1, "d": 1},
    ]
    return script, steps
