"""From an OpenAI request to engine inputs: SamplingParams, the max_tokens that fits, and the
session key that routes a conversation to the replica holding its cached prefix."""

from __future__ import annotations

import hashlib
import json

from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.serving.errors import BadRequestError
from ernie_cluster.serving.protocol import ChatCompletionRequest, SamplingFields
from ernie_cluster.serving.settings import ServingSettings

SESSION_HEADER = "x-session-id"


def resolve_max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int) -> int:
    if num_prompt_tokens >= max_model_len:
        raise BadRequestError(
            f"the prompt has {num_prompt_tokens} tokens but max_model_len is {max_model_len}",
            param="messages",
            code="context_length_exceeded",
        )
    if requested is None:
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + requested > max_model_len:
        raise BadRequestError(
            f"this model's maximum context length is {max_model_len} tokens, but the request "
            f"has {num_prompt_tokens} prompt tokens and asks for {requested} completion tokens "
            f"({num_prompt_tokens + requested} in total)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def to_sampling_params(
    request: SamplingFields,
    settings: ServingSettings,
    max_tokens: int,
    logprobs: int | None,
    skip_special_tokens: bool,
) -> SamplingParams:
    defaults = settings.default_sampling
    temperature = request.temperature
    if temperature is None:
        temperature = defaults.get("temperature", 1.0)
    top_p = request.top_p if request.top_p is not None else defaults.get("top_p", 1.0)
    top_k = request.top_k if request.top_k is not None else int(defaults.get("top_k", 0))
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    try:
        return SamplingParams(
            n=request.n,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=request.min_p or 0.0,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=request.repetition_penalty or 1.0,
            seed=request.seed,
            max_tokens=max_tokens,
            min_tokens=min(request.min_tokens, max_tokens),
            stop=stop,
            stop_token_ids=list(request.stop_token_ids or []),
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=skip_special_tokens,
        )
    except ValueError as exc:
        raise BadRequestError(str(exc)) from exc


def session_key(header_value: str | None, user: str | None, request: SamplingFields) -> str:
    """x-session-id header, else the `user` field, else a hash of the conversation's start."""
    if header_value:
        return f"session:{header_value}"
    if user:
        return f"user:{user}"
    if isinstance(request, ChatCompletionRequest):
        leading = [m.model_dump(exclude_none=True) for m in request.messages[:2]]
        material = json.dumps(leading, sort_keys=True, ensure_ascii=False)
    else:
        prompt = getattr(request, "prompt", "")
        material = json.dumps(prompt if isinstance(prompt, str) else prompt[:1])[:2048]
    return "prefix:" + hashlib.blake2b(material.encode(), digest_size=12).hexdigest()
