"""POST /v1/completions: text or token-id prompts (one or a batch) -> engine -> choices,
whole or streamed. A batch of prompts goes to the engine client as one call (admitted
together, sharing steps) whose deltas come back merged; choice i*n+j is sample j of prompt i.

`echo` with `logprobs` scores the prompt as OpenAI's legacy API and vLLM do (the engine computes
prompt logprobs; `max_tokens: 0` generates nothing), and vLLM's `prompt_logprobs` field returns
them per choice; a streamed choice carries the prompt's part in its first chunk."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ernie_cluster.inputs.engine_request import EngineRequest
from ernie_cluster.outputs import CompletionOutput, accumulate
from ernie_cluster.serving.chat import usage
from ernie_cluster.serving.constraints import request_constraint
from ernie_cluster.serving.engine_client import EngineClient
from ernie_cluster.serving.errors import BadRequestError, OpenAIError
from ernie_cluster.serving.limits import check_request
from ernie_cluster.serving.logprobs import completion_logprobs, requested_prompt_logprobs
from ernie_cluster.serving.metrics import ServingMetrics
from ernie_cluster.serving.off_loop import plan_request
from ernie_cluster.serving.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    random_id,
)
from ernie_cluster.serving.request_params import bad_request, to_sampling_params
from ernie_cluster.serving.settings import ServingSettings
from ernie_cluster.serving.sse import DONE, peeked, sse

logger = logging.getLogger(__name__)


@dataclass
class CompletionHandler:
    client: EngineClient
    settings: ServingSettings
    metrics: ServingMetrics

    def prompts(self, request: CompletionRequest) -> list[str | list[int]]:
        raw = request.prompt
        if isinstance(raw, str):
            items: list = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            items = [raw]
        else:
            items = list(raw)
        if not items:
            raise BadRequestError("prompt must not be empty", param="prompt")
        return items

    def check(self, request: CompletionRequest, prompts: list[str | list[int]]) -> None:
        """The cheap checks, before any prompt is tokenized: counts, lengths, limits."""
        if request.suffix:
            raise BadRequestError("suffix is not supported", param="suffix")
        check_request(request, self.settings.limits, num_prompts=len(prompts))
        processor = self.settings.processor
        try:
            processor.check_text_size(
                sum(len(item) for item in prompts if isinstance(item, str)), "prompt"
            )
            for item in prompts:
                if not isinstance(item, str):
                    processor.resolve_max_tokens(len(item), request.max_output_tokens)
        except ValueError as exc:
            raise bad_request(exc) from exc

    def plan(self, request: CompletionRequest, base_id: str) -> list[EngineRequest]:
        """One engine request per prompt, all validated before any reaches the engine.
        Prompts are tokenized and their lengths checked before the (costlier) constraint is
        built, so an over-long prompt is refused without building a grammar."""
        processor = self.settings.processor
        tokenizer = self.settings.tokenizer
        tokenized = []
        for prompt in self.prompts(request):
            text, token_ids = processor.tokenize(prompt)
            processor.resolve_max_tokens(len(token_ids), request.max_output_tokens)
            if text is None and tokenizer is not None:
                text = tokenizer.decode(token_ids, skip_special_tokens=False)
            tokenized.append((text, token_ids))
        params = to_sampling_params(
            request,
            logprobs=request.logprobs,
            skip_special_tokens=request.skip_special_tokens,
            constraint=request_constraint(request),
        )
        params.prompt_logprobs = engine_prompt_logprobs(request)
        try:
            params.validate()
        except ValueError as exc:
            raise bad_request(exc) from exc
        requests = []
        for i, (text, token_ids) in enumerate(tokenized):
            engine_request = processor.process(
                f"{base_id}-{i}", token_ids, params, priority=request.priority
            )
            engine_request.prompt_text = text
            requests.append(engine_request)
        return requests

    async def create(
        self, request: CompletionRequest, session_key: str, body_bytes: int = 0
    ) -> tuple[CompletionResponse | AsyncIterator[str], str | None]:
        """The response (or its SSE stream) and the replica serving it."""
        self.check(request, self.prompts(request))
        base_id = random_id("cmpl")
        try:
            requests = await plan_request(lambda: self.plan(request, base_id), body_bytes)
        except ValueError as exc:
            raise bad_request(exc) from exc
        prompts = [(r.prompt_text, r.prompt_token_ids) for r in requests]
        trackers = [self.metrics.track(r.request_id, len(r.prompt_token_ids)) for r in requests]
        # NOTE: one call for every prompt: the batch is admitted at once and shares steps.
        try:
            outputs = await peeked(self.client.generate_batch(requests, session_key=session_key))
        except BaseException as exc:
            for tracker in trackers:
                tracker.finish(exc)
            raise
        replica = outputs.replica
        if request.stream:
            return self._stream(request, base_id, prompts, outputs, trackers), replica
        try:
            response = await self._collect(request, base_id, prompts, outputs, trackers)
        except BaseException as exc:
            for tracker in trackers:
                tracker.finish(exc)
            raise
        for tracker in trackers:
            tracker.finish(None)
        return response, replica

    def _choice_text(self, request, prompt_text: str | None, text: str, first: bool) -> str:
        return (prompt_text or "") + text if request.echo and first else text

    async def _collect(self, request, base_id, prompts, outputs, trackers) -> CompletionResponse:
        n = request.n
        results: list[dict[int, CompletionOutput]] = [{} for _ in prompts]
        prompt_entries: list[list | None] = [None] * len(prompts)
        async for i, output in outputs:
            trackers[i].on_output(output)
            accumulate(results[i], output)
            if output.prompt_logprobs is not None:
                prompt_entries[i] = output.prompt_logprobs
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, ((prompt_text, ids), samples) in enumerate(zip(prompts, results, strict=True)):
            prompt_tokens += len(ids)
            for j in range(n):
                sample = samples[j]
                completion_tokens += len(sample.token_ids)
                choices.append(
                    CompletionChoice(
                        index=i * n + j,
                        text=self._choice_text(request, prompt_text, sample.text, True),
                        logprobs=self._logprobs(request, ids, prompt_entries[i], sample, 0),
                        prompt_logprobs=self._prompt_logprobs(request, ids, prompt_entries[i]),
                        finish_reason=sample.finish_reason,
                        stop_reason=sample.stop_reason,
                    )
                )
        return CompletionResponse(
            id=base_id,
            model=request.model,
            system_fingerprint=self.settings.system_fingerprint,
            choices=choices,
            usage=usage(prompt_tokens, completion_tokens, cached_tokens(trackers)),
        )

    def _logprobs(
        self,
        request: CompletionRequest,
        prompt_ids: list[int] | None,
        prompt_entries: list | None,
        sample: CompletionOutput,
        text_offset: int,
    ):
        """The legacy logprobs object of a choice (or of one streamed chunk): over the prompt
        too when `prompt_ids` is given (echo); None when logprobs were not asked."""
        if request.logprobs is None:
            return None
        token_ids, entries = sample.token_ids, list(sample.logprobs or [])
        if request.echo and prompt_ids is not None:
            token_ids = list(prompt_ids) + token_ids
            entries = list(prompt_entries or [None] * len(prompt_ids)) + entries
        return completion_logprobs(
            self.settings.tokenizer, token_ids, entries, request.logprobs, text_offset
        )

    def _prompt_logprobs(self, request: CompletionRequest, prompt_ids, prompt_entries):
        return requested_prompt_logprobs(
            self.settings.tokenizer, request.prompt_logprobs, prompt_ids, prompt_entries
        )

    async def _stream(self, request, base_id, prompts, outputs, trackers) -> AsyncIterator[str]:
        created = int(time.time())
        n = request.n
        echoed: set[int] = set()
        text_offsets: dict[int, int] = {}
        prompt_entries: list[list | None] = [None] * len(prompts)
        completion_tokens = 0
        error: BaseException | None = None
        try:
            async for i, item in outputs:
                trackers[i].on_output(item)
                if item.prompt_logprobs is not None:
                    prompt_entries[i] = item.prompt_logprobs
                for sample in item.outputs:
                    index = i * n + sample.index
                    text = sample.text
                    # NOTE: a choice's first chunk carries the echoed prompt, its logprobs
                    # and the prompt_logprobs field (the engine's first output has them).
                    first = index not in echoed
                    echoed.add(index)
                    prompt_ids = prompts[i][1] if first else None
                    if request.echo and first:
                        text = (prompts[i][0] or "") + text
                    completion_tokens += len(sample.token_ids)
                    logprobs = None
                    if sample.logprobs or (request.echo and first):
                        offset = text_offsets.get(index, 0)
                        logprobs = self._logprobs(
                            request, prompt_ids, prompt_entries[i], sample, offset
                        )
                        if logprobs is not None and logprobs.tokens:
                            text_offsets[index] = logprobs.text_offset[-1] + len(
                                logprobs.tokens[-1]
                            )
                    yield sse(
                        CompletionResponse(
                            id=base_id,
                            created=created,
                            model=request.model,
                            system_fingerprint=self.settings.system_fingerprint,
                            choices=[
                                CompletionChoice(
                                    index=index,
                                    text=text,
                                    logprobs=logprobs,
                                    prompt_logprobs=self._prompt_logprobs(
                                        request, prompts[i][1], prompt_entries[i]
                                    )
                                    if first
                                    else None,
                                    finish_reason=sample.finish_reason,
                                    stop_reason=sample.stop_reason,
                                )
                            ],
                        )
                    )
            if request.stream_options and request.stream_options.include_usage:
                prompt_tokens = sum(len(ids) for _, ids in prompts)
                yield sse(
                    CompletionResponse(
                        id=base_id,
                        created=created,
                        model=request.model,
                        system_fingerprint=self.settings.system_fingerprint,
                        choices=[],
                        usage=usage(prompt_tokens, completion_tokens, cached_tokens(trackers)),
                    )
                )
            yield DONE
        except OpenAIError as exc:
            error = exc
            yield sse(exc.body())
            yield DONE
        except Exception as exc:
            error = exc
            logger.exception("completion stream %s failed", base_id)
            yield sse(OpenAIError(f"generation failed: {exc}").body())
            yield DONE
        except BaseException as exc:
            error = exc
            raise
        finally:
            await outputs.aclose()
            for tracker in trackers:
                tracker.finish(error)


def cached_tokens(trackers) -> int:
    return sum(tracker.num_cached_tokens for tracker in trackers)


def engine_prompt_logprobs(request: CompletionRequest) -> int | None:
    """The top-k the engine computes for the prompt: enough for the echoed logprobs object
    (`echo` with `logprobs`) and for the `prompt_logprobs` field; None when neither asks."""
    asked = [request.prompt_logprobs]
    if request.echo and request.logprobs is not None:
        asked.append(request.logprobs)
    counts = [k for k in asked if k is not None]
    return max(counts) if counts else None
