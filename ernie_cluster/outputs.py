"""What generation returns (public API): one RequestOutput per prompt, one CompletionOutput
per sample. Streaming returns the same types with only the new tokens and text (deltas)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    """One {token_id: logprob} per generated token; the sampled token is always a key."""
    finish_reason: str | None = None
    """'stop' (stop token or string), 'length' (max_tokens or context), 'abort' or None."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the sample, if any."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def extend(self, delta: CompletionOutput) -> None:
        """Append a later delta of the same sample (text, tokens, logprobs, finish)."""
        self.text += delta.text
        self.token_ids = self.token_ids + delta.token_ids
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


def accumulate(samples: dict[int, CompletionOutput], output: RequestOutput) -> None:
    """Fold one streamed RequestOutput into whole samples, by sample index."""
    for delta in output.outputs:
        if delta.index in samples:
            samples[delta.index].extend(delta)
        else:
            samples[delta.index] = replace(
                delta,
                token_ids=list(delta.token_ids),
                logprobs=list(delta.logprobs) if delta.logprobs is not None else None,
            )


@dataclass
class RequestMetrics:
    """Monotonic timestamps (seconds) of one request inside the engine."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """With `SamplingParams.prompt_logprobs`: one entry per prompt token, None for the first
    (nothing precedes it), then {token_id: logprob} of its top-k alternatives and the prompt
    token itself (vLLM's shape). Streamed deltas carry it in the first output only."""
