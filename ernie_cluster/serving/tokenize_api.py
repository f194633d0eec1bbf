"""vLLM's tokenizer routes: POST /tokenize, POST /detokenize, GET /tokenizer_info.

Benchmark tools and lm-eval probe them to count tokens the server's way. Shapes follow vLLM:
`/tokenize` takes a `prompt` or chat `messages` (rendered with the chat template) and answers
`{count, max_model_len, tokens, token_strs}`; `/detokenize` takes `tokens` and answers
`{prompt}`. Planning a large body runs off the event loop, as for generation requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from ernie_cluster.serving.errors import BadRequestError
from ernie_cluster.serving.off_loop import plan_request
from ernie_cluster.serving.protocol import ChatMessage, OpenAIModel, RequestBody, TokenId, Tool
from ernie_cluster.serving.request_params import bad_request
from ernie_cluster.serving.settings import ServingSettings


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    """For `prompt`: add the tokenizer's BOS/EOS as its config says (ERNIE adds none)."""
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[TokenId] = Field(max_length=1_048_576)


class DetokenizeResponse(OpenAIModel):
    prompt: str


@dataclass
class TokenizeHandler:
    settings: ServingSettings

    def _tokenizer(self):
        if self.settings.tokenizer is None:
            raise BadRequestError("this checkpoint has no tokenizer files")
        return self.settings.tokenizer

    async def tokenize(self, request: TokenizeRequest, body_bytes: int) -> TokenizeResponse:
        if (request.prompt is None) == (request.messages is None):
            raise BadRequestError("give either prompt or messages", param="prompt")
        self.settings.limits.check_tools(len(request.tools or []))
        return await plan_request(lambda: self._tokenize(request), body_bytes)

    def _tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        from ernie_cluster.serving.chat import template_messages

        tokenizer = self._tokenizer()
        processor = self.settings.processor
        try:
            if request.messages is not None:
                text_size = sum(len(m.text() or "") for m in request.messages)
                processor.check_text_size(text_size, "messages")
                text = tokenizer.apply_chat_template(
                    template_messages(request),
                    tools=[t.model_dump(exclude_none=True) for t in request.tools or []] or None,
                    add_generation_prompt=request.add_generation_prompt,
                    **(request.chat_template_kwargs or {}),
                )
            else:
                text = request.prompt or ""
                processor.check_text_size(len(text), "prompt")
            tokens = tokenizer.encode(text, add_special_tokens=request.add_special_tokens)
        except (ValueError, TypeError) as exc:
            raise bad_request(ValueError(str(exc))) from exc
        return TokenizeResponse(
            count=len(tokens),
            max_model_len=self.settings.max_model_len,
            tokens=tokens,
            token_strs=tokenizer.convert_ids_to_tokens(tokens)
            if request.return_token_strs
            else None,
        )

    async def detokenize(self, request: DetokenizeRequest, body_bytes: int) -> DetokenizeResponse:
        self.settings.processor.check_token_ids(request.tokens, "tokens")
        tokenizer = self._tokenizer()
        text = await plan_request(
            lambda: tokenizer.decode(request.tokens, skip_special_tokens=False), body_bytes
        )
        return DetokenizeResponse(prompt=text)

    def tokenizer_info(self) -> dict[str, Any]:
        tokenizer = self._tokenizer()
        special = {f"{role}_token": token for role, token in tokenizer.special_tokens.items()}
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "vocab_size": tokenizer.vocab_size,
            "model_max_length": self.settings.max_model_len,
            **special,
            "chat_template": tokenizer.chat_template,
        }
