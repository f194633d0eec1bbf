"""POST /v1/chat/completions: messages -> chat template -> engine -> reasoning, content and
tool calls, whole or streamed as server-sent events.

Tool choice: "none" leaves tools out of the prompt and never parses calls; "auto" renders
them and parses whatever the model emits (a call to a strict tool is grammar-constrained);
"required" and a named function constrain the answer to tool calls (serving.constraints).
With the reasoning parser on, every constraint starts after `</think>`, so the model thinks
freely first. Errors raised before the first token are HTTP errors; later ones end the stream
with an error event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ernie_cluster.inputs.engine_request import EngineRequest
from ernie_cluster.outputs import CompletionOutput, RequestOutput, accumulate
from ernie_cluster.serving.chat_prompt_logprobs import prompt_logprobs_of, with_first
from ernie_cluster.serving.constraints import chat_constraint
from ernie_cluster.serving.engine_client import EngineClient
from ernie_cluster.serving.errors import BadRequestError, OpenAIError
from ernie_cluster.serving.limits import check_request
from ernie_cluster.serving.logprobs import chat_logprobs
from ernie_cluster.serving.metrics import ServingMetrics
from ernie_cluster.serving.off_loop import plan_request
from ernie_cluster.serving.parsers import ErnieX1Parser, make_parser
from ernie_cluster.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaOut,
    FunctionCallDelta,
    FunctionCallOut,
    NamedToolChoice,
    ToolCallDeltaOut,
    ToolCallOut,
    Usage,
    random_id,
)
from ernie_cluster.serving.request_params import bad_request, to_sampling_params
from ernie_cluster.serving.settings import ServingSettings
from ernie_cluster.serving.sse import DONE, peeked, sse

logger = logging.getLogger(__name__)


@dataclass
class ChatPlan:
    """A validated chat request, ready for the engine."""

    engine_request: EngineRequest
    parse_tools: bool
    use_parser: bool
    top_logprobs: int
    num_choices: int
    include_reasoning: bool
    skip_special_tokens: bool = True
    legacy_functions: bool = False
    """The request gave `functions`: calls are answered as `function_call` (the first one)."""

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.engine_request.prompt_token_ids


@dataclass
class StreamState:
    """One streamed choice: tokens so far (for usage) and its incremental parser."""

    token_ids: list[int] = field(default_factory=list)
    parser: ErnieX1Parser | None = None


def template_messages(request: ChatCompletionRequest) -> list[dict]:
    """Pydantic messages -> the plain dicts chat templates expect."""
    messages = []
    for message in request.messages:
        item: dict = {
            "role": "system" if message.role == "developer" else message.role,
            "content": message.text() or "",
        }
        if message.tool_calls:
            item["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
                for call in message.tool_calls
            ]
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        if message.name:
            item["name"] = message.name
        if message.reasoning_content:
            item["thoughts"] = message.reasoning_content
        messages.append(item)
    return messages


@dataclass
class ChatHandler:
    client: EngineClient
    settings: ServingSettings
    metrics: ServingMetrics

    # ------------------------------------------------------------------------ planning
    def plan(self, request: ChatCompletionRequest, request_id: str) -> ChatPlan:
        check_text_output(request)
        tokenizer = self.settings.tokenizer
        if tokenizer is None or tokenizer.chat_template is None:
            raise BadRequestError("this model has no chat template: use /v1/completions")
        tools = request.tools or []
        tool_names = [tool.function.name for tool in tools]
        choice = request.tool_choice or ("auto" if tools else "none")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in tool_names:
            raise BadRequestError(
                f"tool_choice names the function {choice.function.name!r}, which is not "
                f"among the request's tools {tool_names}",
                param="tool_choice",
            )
        forced = isinstance(choice, NamedToolChoice) or choice == "required"
        if choice == "required" and not tools:
            raise BadRequestError("tool_choice 'required' needs tools", param="tool_choice")
        if forced and self.settings.tool_call_parser is None:
            raise BadRequestError(
                "tool_choice 'required' or a named function needs the server started with "
                "--tool-call-parser",
                param="tool_choice",
            )
        parse_tools = choice != "none" and self.settings.tool_call_parser is not None
        if request.top_logprobs is not None and not request.logprobs:
            raise BadRequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        try:
            self.settings.processor.check_text_size(
                sum(len(m.text() or "") for m in request.messages), "messages"
            )
        except ValueError as exc:
            raise bad_request(exc) from exc
        try:
            prompt = tokenizer.apply_chat_template(
                template_messages(request),
                tools=[t.model_dump(exclude_none=True) for t in tools]
                if choice != "none"
                else None,
                add_generation_prompt=request.add_generation_prompt,
                **(request.chat_template_kwargs or {}),
            )
        except (ValueError, TypeError) as exc:
            raise BadRequestError(
                f"cannot render the chat template: {exc}", param="messages"
            ) from exc
        use_parser = self.settings.reasoning_parser is not None or parse_tools
        after_reasoning = self.settings.reasoning_parser is not None
        top_logprobs = request.top_logprobs or 0
        processor = self.settings.processor
        try:
            # NOTE: the prompt's length is checked before the constraint is built: an
            # over-long prompt costs no grammar.
            text, token_ids = processor.tokenize(prompt, "messages")
            processor.resolve_max_tokens(len(token_ids), request.max_output_tokens, "messages")
            constraint = chat_constraint(request, after_reasoning)
            params = to_sampling_params(
                request,
                logprobs=top_logprobs if request.logprobs else None,
                skip_special_tokens=False if use_parser else request.skip_special_tokens,
                constraint=constraint,
            )
            params.prompt_logprobs = request.prompt_logprobs
            engine_request = processor.process(
                request_id,
                token_ids,
                params,
                priority=request.priority,
                constrain_after_reasoning=after_reasoning,
                prompt_param="messages",
            )
            engine_request.prompt_text = text
        except ValueError as exc:
            raise bad_request(exc) from exc
        return ChatPlan(
            engine_request,
            parse_tools,
            use_parser,
            top_logprobs,
            request.n,
            request.include_reasoning,
            request.skip_special_tokens,
            request.uses_legacy_functions,
        )

    def _parser(self, plan: ChatPlan) -> ErnieX1Parser | None:
        if not plan.use_parser:
            return None
        return make_parser(
            self.settings.reasoning_parser,
            self.settings.tool_call_parser,
            tools_enabled=plan.parse_tools,
        )

    # ------------------------------------------------------------------------ running
    async def create(
        self, request: ChatCompletionRequest, session_key: str, body_bytes: int = 0
    ) -> tuple[ChatCompletionResponse | AsyncIterator[str], str | None]:
        """The response (or its SSE stream) and the replica serving it."""
        request_id = random_id("chatcmpl")
        check_request(request, self.settings.limits)
        plan = await plan_request(lambda: self.plan(request, request_id), body_bytes)
        tracker = self.metrics.track(request_id, len(plan.prompt_token_ids))
        try:
            outputs = await peeked(
                self.client.generate(plan.engine_request, session_key=session_key)
            )
        except BaseException as exc:
            tracker.finish(exc)
            raise
        replica = outputs.replica
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            stream = self._stream(request, plan, request_id, outputs, tracker, include_usage)
            return stream, replica
        try:
            response = await self._collect(request, plan, request_id, outputs, tracker)
        except BaseException as exc:
            tracker.finish(exc)
            raise
        tracker.finish(None)
        return response, replica

    async def _collect(
        self,
        request,
        plan: ChatPlan,
        request_id: str,
        outputs: AsyncIterator[RequestOutput],
        tracker,
    ) -> ChatCompletionResponse:
        samples: dict[int, CompletionOutput] = {}
        cached = 0
        prompt_logprobs = None
        async for output in outputs:
            tracker.on_output(output)
            cached = output.num_cached_tokens
            accumulate(samples, output)
            prompt_logprobs = prompt_logprobs or self._prompt_logprobs(request, plan, output)
        choices = [samples[i] for i in sorted(samples)]
        result = []
        for index, state in enumerate(choices):
            message = AssistantMessage(content=state.text)
            finish = state.finish_reason
            parser = self._parser(plan)
            if parser is not None:
                parsed = parser.parse(state.text)
                message = AssistantMessage(
                    content=self._visible(parsed.content, plan),
                    reasoning_content=self._visible(parsed.reasoning_content, plan)
                    if plan.include_reasoning
                    else None,
                    tool_calls=[
                        ToolCallOut(
                            id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)
                        )
                        for c in parsed.tool_calls
                    ]
                    or None,
                )
                if parsed.tool_calls and finish == "stop":
                    finish = "tool_calls"
                if plan.legacy_functions and message.tool_calls:
                    message.function_call = message.tool_calls[0].function
                    message.tool_calls = None
                    finish = "function_call" if finish == "tool_calls" else finish
            logprobs = None
            if request.logprobs:
                logprobs = chat_logprobs(
                    self.settings.tokenizer,
                    state.token_ids,
                    state.logprobs or [],
                    plan.top_logprobs,
                )
            result.append(
                ChatChoice(
                    index=index,
                    message=message,
                    logprobs=logprobs,
                    finish_reason=finish,
                    stop_reason=state.stop_reason,
                )
            )
        completion_tokens = sum(len(c.token_ids) for c in choices)
        return ChatCompletionResponse(
            id=request_id,
            model=request.model,
            choices=result,
            usage=usage(
                len(plan.prompt_token_ids),
                completion_tokens,
                cached,
                self._reasoning_tokens([c.token_ids for c in choices]),
            ),
            system_fingerprint=self.settings.system_fingerprint,
            prompt_logprobs=prompt_logprobs,
        )

    def _prompt_logprobs(self, request, plan: ChatPlan, output: RequestOutput | None):
        tokenizer = self.settings.tokenizer
        return prompt_logprobs_of(tokenizer, request, plan.prompt_token_ids, output)

    def _reasoning_tokens(self, outputs: list[list[int]]) -> int | None:
        if self.settings.reasoning_parser is None:
            return None
        end = self.settings.facts.reasoning_end_token_id
        return sum(count_reasoning_tokens(ids, end) for ids in outputs)

    async def _stream(
        self,
        request,
        plan: ChatPlan,
        request_id: str,
        outputs: AsyncIterator[RequestOutput],
        tracker,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        choices = [StreamState(parser=self._parser(plan)) for _ in range(plan.num_choices)]
        cached = 0
        error: BaseException | None = None

        def chunk(choice_list, usage_value=None, prompt_logprobs=None) -> str:
            return sse(
                ChatCompletionChunk(
                    id=request_id,
                    created=created,
                    model=request.model,
                    choices=choice_list,
                    usage=usage_value,
                    system_fingerprint=self.settings.system_fingerprint,
                    prompt_logprobs=prompt_logprobs,
                )
            )

        try:
            # NOTE: `peeked` already holds the first output: reading it here costs no wait.
            first = await anext(outputs, None)
            prompt_logprobs = self._prompt_logprobs(request, plan, first)
            for index in range(plan.num_choices):
                yield chunk(
                    [ChatChunkChoice(index=index, delta=DeltaOut(role="assistant", content=""))],
                    prompt_logprobs=None if index else prompt_logprobs,
                )
            async for output in with_first(first, outputs):
                tracker.on_output(output)
                cached = output.num_cached_tokens
                for sample in output.outputs:
                    state = choices[sample.index]
                    state.token_ids += sample.token_ids
                    delta = self._delta(state, sample.text, plan)
                    finish = None
                    if sample.finish_reason is not None:
                        if state.parser is not None:
                            merge(delta, self._delta_from(state.parser.finish(), plan))
                            if state.parser.has_tool_calls and sample.finish_reason == "stop":
                                finish = "function_call" if plan.legacy_functions else "tool_calls"
                        finish = finish or sample.finish_reason
                    logprobs = None
                    if request.logprobs and sample.logprobs:
                        logprobs = chat_logprobs(
                            self.settings.tokenizer,
                            sample.token_ids,
                            sample.logprobs,
                            plan.top_logprobs,
                        )
                    if is_empty(delta) and finish is None and logprobs is None:
                        continue
                    yield chunk(
                        [
                            ChatChunkChoice(
                                index=sample.index,
                                delta=delta,
                                logprobs=logprobs,
                                finish_reason=finish,
                            )
                        ]
                    )
            if include_usage:
                completion_tokens = sum(len(c.token_ids) for c in choices)
                reasoning = self._reasoning_tokens([c.token_ids for c in choices])
                prompt_tokens = len(plan.prompt_token_ids)
                yield chunk([], usage(prompt_tokens, completion_tokens, cached, reasoning))
            yield DONE
        except OpenAIError as exc:
            error = exc
            yield sse(exc.body())
            yield DONE
        except Exception as exc:  # the stream has started: report in-band, never a bare 500
            error = exc
            logger.exception("chat stream %s failed", request_id)
            yield sse(OpenAIError(f"generation failed: {exc}").body())
            yield DONE
        except BaseException as exc:  # client went away (cancellation)
            error = exc
            raise
        finally:
            await outputs.aclose()
            tracker.finish(error)

    def _visible(self, text: str | None, plan: ChatPlan) -> str | None:
        """`text` without the added tokens' text when the request skips special tokens.

        NOTE: with a parser the engine decodes every token (the parser must see `</think>`,
        `<response>`, `<tool_call>` whole); what the parser leaves in a text field is cleaned
        here. A token's text always arrives within one delta, so deltas clean alike.
        """
        pattern = self.settings.tokenizer.added_token_pattern if plan.skip_special_tokens else None
        if not text or pattern is None:
            return text
        return pattern.sub("", text)

    def _delta(self, state: StreamState, text: str, plan: ChatPlan) -> DeltaOut:
        if state.parser is None:
            return DeltaOut(content=text or None)
        return self._delta_from(state.parser.feed(text), plan)

    def _delta_from(self, parsed, plan: ChatPlan) -> DeltaOut:
        calls = [
            ToolCallDeltaOut(
                index=c.index,
                id=c.id,
                type="function" if c.id else None,
                function=FunctionCallDelta(name=c.name, arguments=c.arguments),
            )
            for c in parsed.tool_calls
        ]
        delta = DeltaOut(
            content=self._visible(parsed.content, plan) or None,
            reasoning_content=(self._visible(parsed.reasoning_content, plan) or None)
            if plan.include_reasoning
            else None,
            tool_calls=calls or None,
        )
        if plan.legacy_functions and calls:
            first = [c.function for c in calls if c.index == 0]
            delta.function_call, delta.tool_calls = (first[0] if first else None), None
        return delta


def check_text_output(request: ChatCompletionRequest) -> None:
    """This model writes text: refuse requests for audio or web search, with a worded 400."""
    if request.modalities is not None and set(request.modalities) - {"text"}:
        raise BadRequestError(
            f"modalities {request.modalities} asks for output this model cannot give: it "
            'writes text only (["text"])',
            param="modalities",
        )
    if request.audio is not None:
        raise BadRequestError("this model writes text only: audio output is not available", "audio")
    if request.web_search_options is not None:
        raise BadRequestError(
            "web search is not available on this server: leave web_search_options out",
            param="web_search_options",
        )


def merge(into: DeltaOut, other: DeltaOut) -> None:
    if other.content:
        into.content = (into.content or "") + other.content
    if other.reasoning_content:
        into.reasoning_content = (into.reasoning_content or "") + other.reasoning_content
    if other.tool_calls:
        into.tool_calls = (into.tool_calls or []) + other.tool_calls
    if other.function_call:
        into.function_call = into.function_call or other.function_call


def is_empty(delta: DeltaOut) -> bool:
    return not (
        delta.content
        or delta.reasoning_content
        or delta.tool_calls
        or delta.function_call
        or delta.role
    )


def usage(
    prompt_tokens: int, completion_tokens: int, cached: int, reasoning_tokens: int | None = None
) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details={"cached_tokens": cached},
        completion_tokens_details=None
        if reasoning_tokens is None
        else {"reasoning_tokens": reasoning_tokens},
    )


def count_reasoning_tokens(token_ids: list[int], think_end_id: int | None) -> int:
    """Tokens up to and including `</think>` (all of them while it has not come)."""
    if think_end_id is None or think_end_id not in token_ids:
        return len(token_ids)
    return token_ids.index(think_end_id) + 1
