"""OpenAI-compatible request and response bodies (pydantic), the HTTP boundary's types.

Field names and defaults follow the OpenAI API and what vLLM accepts on top of it
(top_k, min_p, repetition_penalty, chat_template_kwargs, structured_outputs, guided_*...).
Ranges are checked here so a bad value is a 400 naming the parameter; cross-field checks live
in the handlers.

Unknown top-level request fields are refused with a 400 naming them, as OpenAI does, so a typo
such as `max_token` never passes unnoticed. Nested objects (messages, tools) accept and ignore
extra keys: clients send back assistant messages with fields such as `refusal` or
`annotations` from earlier responses.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

Temperature = Annotated[float, Field(ge=0.0, le=100.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenId = StrictInt
"""A token id: an integer, never a boolean (pydantic would take `true` as 1)."""
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
"""OpenAI's rule for function names: nothing a name holds can break the tool-call layout."""
Priority = Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class RequestBody(OpenAIModel):
    """A top-level request: unknown fields are errors, and so are NaN and infinite numbers
    (a NaN temperature is "not a finite number", not "greater than 100")."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ------------------------------------------------------------------------------ requests
class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCall(OpenAIModel):
    name: str
    arguments: str | dict[str, Any]


class ToolCallIn(OpenAIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(OpenAIModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class JsonSchemaSpec(OpenAIModel):
    name: str = Field(default="response", max_length=256)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StructuredOutputsField(OpenAIModel):
    """vLLM's `structured_outputs` extra-body field: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None


class SamplingFields(RequestBody):
    """Sampling fields shared by chat and completions."""

    model: Annotated[str, Field(min_length=1)] | None = None
    """None (absent): the first served model name, as vLLM does; model cards' curl examples
    (ERNIE's among them) send no model."""
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[TokenId, Field(ge=0)]] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: Priority = 0
    skip_special_tokens: bool = True
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Accepted from OpenAI clients and ignored: they change nothing a self-hosted model does.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # OpenAI's legacy function calling: mapped onto tools (one call), answered as
    # `message.function_call` with finish_reason "function_call", as OpenAI does.
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    # Accepted as OpenAI clients send them. ERNIE-4.5-Thinking's template always thinks, so
    # `reasoning_effort` and `verbosity` change nothing; output is text only, so `modalities`
    # may only ask for text, `audio` must be null and `web_search_options` is refused.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    prompt_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    """vLLM's field: each token of the rendered prompt, its logprob and its top-k, in the
    response's top-level `prompt_logprobs` (a stream's first chunk)."""
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    include_reasoning: bool = True

    @model_validator(mode="after")
    def _functions_as_tools(self) -> ChatCompletionRequest:
        if self.functions is None and self.function_call is None:
            return self
        if self.tools is not None or self.tool_choice is not None:
            raise ValueError(
                "give tools/tool_choice or the legacy functions/function_call, not both"
            )
        self.tools = [Tool(function=f) for f in self.functions or []]
        if isinstance(self.function_call, NamedFunction):
            self.tool_choice = NamedToolChoice(function=self.function_call)
        else:
            self.tool_choice = self.function_call
        self.parallel_tool_calls = False
        return self

    @property
    def uses_legacy_functions(self) -> bool:
        return self.functions is not None

    @property
    def max_output_tokens(self) -> int | None:
        """The output length asked for (None: up to max_model_len, the processor's)."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16
    """0: nothing is generated (with `echo` and `logprobs`, the prompt is scored)."""
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    echo: bool = False
    """The prompt is returned before the completion; with `logprobs`, the logprobs object
    covers the prompt tokens too (the first one's logprob is null, as OpenAI returns it)."""
    prompt_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    """vLLM's field: each prompt token's logprob and its top-k, in `choices[i].prompt_logprobs`."""
    suffix: str | None = None

    @property
    def max_output_tokens(self) -> int | None:
        """The output length asked for (None: up to max_model_len, the processor's)."""
        return self.max_tokens


# ----------------------------------------------------------------------------- responses
class Usage(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None
    completion_tokens_details: dict[str, int] | None = None
    """`reasoning_tokens`: the completion tokens up to and including `</think>` (with a
    reasoning parser)."""


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIModel):
    content: list[TokenLogprob] | None = None


class PromptLogprob(OpenAIModel):
    """vLLM's Logprob: `rank` is the token's rank in the distribution (1: most likely), given
    for the top-k; a prompt token outside its top-k has none."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class FunctionCallOut(OpenAIModel):
    name: str
    arguments: str


class ToolCallOut(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    function_call: FunctionCallOut | None = None
    """The legacy answer to a request that gave `functions`."""


class ChatChoice(OpenAIModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None
    """vLLM's field (with `prompt_logprobs` asked), one entry per rendered prompt token."""


class FunctionCallDelta(OpenAIModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaOut(OpenAIModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class DeltaOut(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None
    function_call: FunctionCallDelta | None = None


class ChatChunkChoice(OpenAIModel):
    index: int
    delta: DeltaOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None
    """On a stream's first chunk only, with `prompt_logprobs` asked (vLLM refuses it with
    `stream`; here it streams as on /v1/completions)."""


class CompletionLogprobs(OpenAIModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "ernie-cluster"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorDetail
