"""POST /v1/completions: text or token-id prompts (one or a batch) -> engine -> choices,
whole or streamed. A batch of prompts is submitted at once as concurrent engine requests
whose streams are merged; choice i*n+j is sample j of prompt i."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ernie_cluster.inputs.engine_request import EngineRequest
from ernie_cluster.outputs import CompletionOutput, RequestOutput, accumulate
from ernie_cluster.serving.chat import usage
from ernie_cluster.serving.constraints import request_constraint
from ernie_cluster.serving.engine_client import EngineClient
from ernie_cluster.serving.errors import BadRequestError, OpenAIError
from ernie_cluster.serving.logprobs import completion_logprobs
from ernie_cluster.serving.metrics import ServingMetrics
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

MAX_PROMPTS_PER_REQUEST = 256
"""Prompts one /v1/completions request may batch (vLLM sets none; 1000 would hold a replica)."""
# NOTE: tokenizing more text than this moves to a thread, off the event loop.
_OFF_LOOP_CHARS = 32_768


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
        if len(items) > MAX_PROMPTS_PER_REQUEST:
            raise BadRequestError(
                f"a request holds at most {MAX_PROMPTS_PER_REQUEST} prompts, got {len(items)}; "
                "split the batch",
                param="prompt",
            )
        self.settings.processor.check_text_size(
            sum(len(item) for item in items if isinstance(item, str)), "prompt"
        )
        return items

    def plan(self, request: CompletionRequest, base_id: str) -> list[EngineRequest]:
        """One engine request per prompt, all validated before any reaches the engine."""
        constraint = request_constraint(request)
        params = to_sampling_params(
            request,
            self.settings,
            request.max_tokens,
            logprobs=request.logprobs,
            skip_special_tokens=request.skip_special_tokens,
            constraint=constraint,
        )
        processor = self.settings.processor
        tokenizer = self.settings.tokenizer
        requests = []
        for i, prompt in enumerate(self.prompts(request)):
            engine_request = processor.process(
                f"{base_id}-{i}", prompt, params, priority=request.priority
            )
            if engine_request.prompt_text is None and tokenizer is not None:
                engine_request.prompt_text = tokenizer.decode(
                    engine_request.prompt_token_ids, skip_special_tokens=False
                )
            requests.append(engine_request)
        return requests

    async def create(
        self, request: CompletionRequest, session_key: str
    ) -> tuple[CompletionResponse | AsyncIterator[str], str | None]:
        """The response (or its SSE stream) and the replica serving the first prompt."""
        if request.suffix:
            raise BadRequestError("suffix is not supported", param="suffix")
        if request.echo and request.logprobs is not None:
            raise BadRequestError(
                "echo with logprobs needs prompt logprobs, which this server does not compute",
                param="echo",
            )
        base_id = random_id("cmpl")
        raw = request.prompt
        size = len(raw) if isinstance(raw, str) else sum(len(p) for p in raw if isinstance(p, str))
        try:
            if size > _OFF_LOOP_CHARS:
                requests = await asyncio.to_thread(self.plan, request, base_id)
            else:
                requests = self.plan(request, base_id)
        except ValueError as exc:
            raise bad_request(exc) from exc
        prompts = [(r.prompt_text, r.prompt_token_ids) for r in requests]
        trackers = [self.metrics.track(r.request_id, len(r.prompt_token_ids)) for r in requests]
        # NOTE: every prompt is submitted at once, so a batch shares engine steps.
        results = await asyncio.gather(
            *(peeked(self.client.generate(r, session_key=session_key)) for r in requests),
            return_exceptions=True,
        )
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            for result in results:
                if not isinstance(result, BaseException):
                    await result.aclose()
            for tracker in trackers:
                tracker.finish(failure)
            raise failure
        streams = list(results)
        replica = getattr(streams[0], "served_by", None)
        if request.stream:
            return self._stream(request, base_id, prompts, streams, trackers), replica
        try:
            response = await self._collect(request, base_id, prompts, streams, trackers)
        except BaseException as exc:
            for tracker in trackers:
                tracker.finish(exc)
            raise
        for tracker in trackers:
            tracker.finish(None)
        return response, replica

    def _choice_text(self, request, prompt_text: str | None, text: str, first: bool) -> str:
        return (prompt_text or "") + text if request.echo and first else text

    async def _collect(self, request, base_id, prompts, streams, trackers) -> CompletionResponse:
        n = request.n
        results = await asyncio.gather(
            *(drain(s, t) for s, t in zip(streams, trackers, strict=True))
        )
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, ((prompt_text, ids), samples) in enumerate(zip(prompts, results, strict=True)):
            prompt_tokens += len(ids)
            for j in range(n):
                sample = samples[j]
                completion_tokens += len(sample.token_ids)
                logprobs = None
                if request.logprobs is not None:
                    logprobs = completion_logprobs(
                        self.settings.tokenizer,
                        sample.token_ids,
                        sample.logprobs or [],
                        request.logprobs,
                    )
                choices.append(
                    CompletionChoice(
                        index=i * n + j,
                        text=self._choice_text(request, prompt_text, sample.text, True),
                        logprobs=logprobs,
                        finish_reason=sample.finish_reason,
                        stop_reason=sample.stop_reason,
                    )
                )
        return CompletionResponse(
            id=base_id,
            model=request.model,
            choices=choices,
            usage=usage(prompt_tokens, completion_tokens, cached_tokens(trackers)),
        )

    async def _stream(self, request, base_id, prompts, streams, trackers) -> AsyncIterator[str]:
        created = int(time.time())
        n = request.n
        queue: asyncio.Queue = asyncio.Queue()
        echoed: set[int] = set()
        completion_tokens = 0
        error: BaseException | None = None

        async def pump(i: int, stream) -> None:
            try:
                async for output in stream:
                    trackers[i].on_output(output)
                    await queue.put((i, output))
            except BaseException as exc:
                await queue.put((i, exc))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                for sample in item.outputs:
                    index = i * n + sample.index
                    text = sample.text
                    if request.echo and index not in echoed:
                        echoed.add(index)
                        text = (prompts[i][0] or "") + text
                    completion_tokens += len(sample.token_ids)
                    logprobs = None
                    if request.logprobs is not None and sample.logprobs:
                        logprobs = completion_logprobs(
                            self.settings.tokenizer,
                            sample.token_ids,
                            sample.logprobs,
                            request.logprobs,
                        )
                    yield sse(
                        CompletionResponse(
                            id=base_id,
                            created=created,
                            model=request.model,
                            choices=[
                                CompletionChoice(
                                    index=index,
                                    text=text,
                                    logprobs=logprobs,
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
            for task in tasks:
                task.cancel()
            # The pumps must be done with their streams before the streams are closed.
            await asyncio.gather(*tasks, return_exceptions=True)
            for stream in streams:
                await stream.aclose()
            for tracker in trackers:
                tracker.finish(error)


def cached_tokens(trackers) -> int:
    return sum(tracker.num_cached_tokens for tracker in trackers)


async def drain(stream: AsyncIterator[RequestOutput], tracker) -> list[CompletionOutput]:
    """All samples of one engine request, whole, in index order."""
    samples: dict[int, CompletionOutput] = {}
    async for output in stream:
        tracker.on_output(output)
        accumulate(samples, output)
    return [samples[k] for k in sorted(samples)]
