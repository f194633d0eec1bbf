"""From an OpenAI request to engine inputs: SamplingParams (output constraint included), and
the session key that routes a conversation to the replica holding its cached prefix. Limits
that depend on the prompt (max_tokens, vocabulary) are the input processor's."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ernie_cluster.sampling_params import SamplingParams, StructuredOutputsParams
from ernie_cluster.serving.errors import BadRequestError
from ernie_cluster.serving.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

SESSION_HEADER = "x-session-id"


def bad_request(exc: ValueError) -> BadRequestError:
    """An input problem as a 400, keeping the parameter and code an InputError names."""
    return BadRequestError(
        str(exc), param=getattr(exc, "param", None), code=getattr(exc, "code", None)
    )


def to_sampling_params(
    request: ChatCompletionRequest | CompletionRequest,
    logprobs: int | None,
    skip_special_tokens: bool,
    constraint: dict[str, Any] | None = None,
) -> SamplingParams:
    """`constraint`: the request's output format (see serving.constraints), if any."""
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    max_tokens = request.max_output_tokens
    try:
        return SamplingParams(
            n=request.n,
            temperature=request.temperature,  # None: the checkpoint's (the processor's)
            top_p=request.top_p,
            top_k=request.top_k,
            min_p=request.min_p or 0.0,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=request.repetition_penalty or 1.0,
            seed=request.seed,
            max_tokens=max_tokens,
            min_tokens=min(request.min_tokens, max_tokens or request.min_tokens),
            stop=stop,
            stop_token_ids=list(request.stop_token_ids or []),
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=skip_special_tokens,
            logit_bias=_logit_bias(request.logit_bias),
            structured_outputs=None
            if constraint is None
            else StructuredOutputsParams(
                structural_tag={"type": "structural_tag", "format": constraint}
            ),
        )
    except ValueError as exc:
        raise bad_request(exc) from exc


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    if not raw:
        return None
    try:
        return {int(token): bias for token, bias in raw.items()}
    except ValueError as exc:
        raise BadRequestError(
            f"logit_bias keys must be token ids, got {sorted(raw)[:5]}", param="logit_bias"
        ) from exc


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
