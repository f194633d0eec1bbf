"""Turns sampled tokens into user-facing outputs: detokenization, stop strings, n > 1 groups.

Runs on the driver after each step, after the scheduler has appended the tokens and ended the
sequences that a stop token or a length limit stops (`scheduler.check_stop`). Owns what needs
the text: stop strings cut from it (after min_tokens) and the streaming hold-back that keeps a
possible stop-string prefix from being sent before it is known not to be one. Stop strings
are matched by `StopStrings`, built once per request and shared by its n sequences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ernie_cluster.engine.request import Request, RequestStatus
from ernie_cluster.engine.stop_strings import StopStrings
from ernie_cluster.outputs import CompletionOutput, RequestMetrics, RequestOutput
from ernie_cluster.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class SequenceState:
    request: Request
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    logprobs: list[dict[int, float]] | None = None
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    finish_reason: str | None = None
    finish_sent: bool = False
    stops: StopStrings | None = None
    """The request's stop strings (one matcher shared by its n sequences); None: none."""
    answer_start: int | None = 0
    """Where in `text` stop strings start to apply: 0, or just after the answer's opening
    `<response>` and its newline once generated (None until then)."""
    answer_opened: bool = False
    """`<response>` came and the newline after it is still to be skipped."""

    def stop_holdback(self) -> int:
        if self.stops is None or self.answer_start is None:
            return 0
        return self.stops.holdback


@dataclass
class RequestGroup:
    """One user request: a prompt and its n sampled sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[SequenceState] = field(default_factory=list)
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """With `params.prompt_logprobs`: None for the first prompt token, then one {token_id:
    logprob} per prompt token as the prefill steps report them; None when not asked."""
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return all(seq.finish_reason is not None for seq in self.sequences)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.groups: dict[str, RequestGroup] = {}
        self.group_of: dict[str, RequestGroup] = {}
        self.sequence_of: dict[str, SequenceState] = {}

    def add_group(self, group: RequestGroup, requests: list[Request]) -> None:
        self.groups[group.request_id] = group
        if requests and requests[0].params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        stop = requests[0].params.stop if requests else None
        stops = StopStrings(stop) if stop else None
        for request in requests:
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_token_ids=request.prompt_token_ids,
                    skip_special_tokens=request.params.skip_special_tokens,
                )
            seq = SequenceState(
                request,
                detok,
                logprobs=[] if request.params.logprobs is not None else None,
                stops=stops,
                answer_start=None if request.answer_start_token_id is not None else 0,
            )
            group.sequences.append(seq)
            self.group_of[request.request_id] = group
            self.sequence_of[request.request_id] = seq

    def add_prompt_logprobs(self, request_id: str, entries: list[dict[int, float]]) -> None:
        """Append the prompt logprobs a step reported for a sequence (its group's prompt)."""
        group = self.group_of.get(request_id)
        if group is not None and group.prompt_logprobs is not None:
            group.prompt_logprobs.extend(entries)

    def process_token(
        self, request: Request, token: int, logprobs: dict[int, float] | None, last: bool = True
    ) -> bool:
        """Record one new token, already appended and stop-checked by the scheduler (a
        finished status there: a stop token or a length limit ended the sequence at the
        step's `last` token; a speculative step brings several); returns True when a stop
        string ends the sequence here."""
        seq = self.sequence_of[request.request_id]
        if seq.logprobs is not None and logprobs is not None:
            seq.logprobs.append(logprobs)
        status = request.status if last else RequestStatus.RUNNING
        if status == RequestStatus.FINISHED_STOPPED:
            # A stop token: its own text is not part of the output (as with stop strings).
            seq.text += seq.detokenizer.flush() if seq.detokenizer else ""
            return False
        delta = seq.detokenizer.add_tokens([token]) if seq.detokenizer else ""
        if seq.answer_opened and delta:
            self._open_answer(seq, delta)
        past_min_tokens = request.num_output_tokens >= request.params.min_tokens
        if past_min_tokens and seq.stops is not None and self._check_stop_strings(seq, delta):
            return True
        seq.text += delta
        if seq.answer_start is None and token == request.answer_start_token_id:
            seq.answer_opened = True
        if status == RequestStatus.FINISHED_LENGTH and seq.detokenizer:
            seq.text += seq.detokenizer.flush()
        return False

    @staticmethod
    def _open_answer(seq: SequenceState, delta: str) -> None:
        """The answer starts with the first character after `<response>`, less the one
        newline the format puts there (the reasoning parser drops it too)."""
        seq.answer_opened = False
        seq.answer_start = len(seq.text) + (1 if delta.startswith("\n") else 0)

    def _check_stop_strings(self, seq: SequenceState, delta: str) -> bool:
        if not delta or seq.answer_start is None:  # still reasoning: stops wait for the answer
            return False
        stops: StopStrings = seq.stops  # type: ignore[assignment]
        text = seq.text
        if seq.answer_start > len(text):  # the answer starts inside this delta
            skipped = seq.answer_start - len(text)
            text, delta = text + delta[:skipped], delta[skipped:]
        # NOTE: only a tail can hold the start of a match; the answer's start bounds it too.
        start = max(seq.answer_start, len(text) - stops.max_len + 1)
        include = seq.request.params.include_stop_str_in_output
        cut = stops.cut(text[start:], delta, include)
        if cut is None:
            return False
        kept, seq.request.stop_reason = cut
        seq.text = text[:start] + kept
        return True

    def mark_finished(self, request: Request) -> None:
        seq = self.sequence_of.get(request.request_id)
        if seq is not None and seq.finish_reason is None:
            seq.finish_reason = request.finish_reason

    def make_output(self, group: RequestGroup, delta: bool) -> RequestOutput:
        """Cumulative outputs, or (delta=True) only what is new since the last call."""
        outputs = []
        for index, seq in enumerate(group.sequences):
            request = seq.request
            finished = seq.finish_reason is not None
            visible = len(seq.text) if finished else max(0, len(seq.text) - seq.stop_holdback())
            visible = max(visible, seq.num_sent_chars)
            token_ids = request.output_token_ids
            if delta:
                text = seq.text[seq.num_sent_chars : visible]
                tokens = token_ids[seq.num_sent_tokens :]
                logprobs = seq.logprobs[seq.num_sent_tokens :] if seq.logprobs is not None else None
                if not text and not tokens and (not finished or seq.finish_sent):
                    continue
            else:
                text, tokens, logprobs = seq.text[:visible], list(token_ids), seq.logprobs
            seq.num_sent_chars, seq.num_sent_tokens = visible, len(token_ids)
            seq.finish_sent = finished
            outputs.append(
                CompletionOutput(
                    index=index,
                    text=text,
                    token_ids=list(tokens),
                    logprobs=list(logprobs) if logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=request.stop_reason if finished else None,
                )
            )
        first = group.sequences[0].request if group.sequences else None
        if first is not None:
            metrics = group.metrics = group.metrics or RequestMetrics(first.arrival_time)
            metrics.first_scheduled_time = first.first_scheduled_time
            now = time.monotonic()
            if metrics.first_token_time is None and any(
                s.request.output_token_ids for s in group.sequences
            ):
                metrics.first_token_time = now
            if group.finished:
                metrics.finished_time = now
        prompt_logprobs = group.prompt_logprobs
        if prompt_logprobs is not None:
            # NOTE: a group's first output comes after its whole prompt was computed (nothing
            # is output before a sample's first token, or the end of a max_tokens = 0 one);
            # deltas carry the prompt logprobs once, in that output.
            if delta and group.prompt_logprobs_sent:
                prompt_logprobs = None
            group.prompt_logprobs_sent = True
            prompt_logprobs = None if prompt_logprobs is None else list(prompt_logprobs)
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=outputs,
            finished=group.finished,
            num_cached_tokens=max(0, first.num_cached_tokens) if first else 0,
            metrics=group.metrics,
            prompt_logprobs=prompt_logprobs,
        )

    def remove_group(self, group: RequestGroup) -> None:
        """Forget a finished or aborted request; its sequences stop waiting for their grammar
        (the last waiter of a compile that has not started cancels it)."""
        self.groups.pop(group.request_id, None)
        for seq in group.sequences:
            if seq.request.grammar is not None:
                seq.request.grammar.release()
            self.group_of.pop(seq.request.request_id, None)
            self.sequence_of.pop(seq.request.request_id, None)
