"""vLLM's `prompt_logprobs` on /v1/chat/completions: the engine scores the rendered chat prompt
(its first output for a request holds one entry per prompt token) and the response carries
the field at the top level, as vLLM's ChatCompletionResponse does.

A stream carries it on its first chunk (the first role chunk). vLLM refuses `prompt_logprobs`
above 0 with `stream`; here it streams, as it does on /v1/completions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ernie_cluster.outputs import RequestOutput
from ernie_cluster.serving.logprobs import requested_prompt_logprobs
from ernie_cluster.serving.protocol import ChatCompletionRequest, PromptLogprob
from ernie_cluster.tokenizer import Tokenizer


def prompt_logprobs_of(
    tokenizer: Tokenizer | None,
    request: ChatCompletionRequest,
    prompt_ids: list[int],
    output: RequestOutput | None,
) -> list[dict[int, PromptLogprob] | None] | None:
    """The field from one engine output: None when the request did not ask, or when `output`
    is not the one holding the prompt's entries (the engine sends them once, first)."""
    entries = None if output is None else output.prompt_logprobs
    return requested_prompt_logprobs(tokenizer, request.prompt_logprobs, prompt_ids, entries)


async def with_first(
    first: RequestOutput | None, rest: AsyncIterator[RequestOutput]
) -> AsyncIterator[RequestOutput]:
    """`first` then the rest of its stream: the stream's first output is read before its
    first chunk (which carries the field), then handled like every other. The caller closes
    `rest`."""
    if first is None:
        return
    yield first
    async for output in rest:
        yield output
