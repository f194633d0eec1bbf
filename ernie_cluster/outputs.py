"""What generation returns (public API): one RequestOutput per prompt, one CompletionOutput
per sample. Streaming returns the same types with only the new tokens and text (deltas)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    served_by: str | None = None
    """The model replica that produced this output (set by the serving layer)."""
