"""Engine logprobs ({token_id: logprob} per generated token) in the two OpenAI shapes, and
vLLM's `prompt_logprobs` field (completions per choice, chat at the top level)."""

from __future__ import annotations

from ernie_cluster.serving.protocol import (
    ChoiceLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    TokenLogprob,
    TopLogprob,
)
from ernie_cluster.tokenizer import Tokenizer


def token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    """A token as clients see it. Byte-fallback tokens keep their piece name ("<0xE4>"): alone
    they are not valid UTF-8, and decoding each to U+FFFD would make distinct tokens collide."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    if token_id in tokenizer.byte_token_ids:
        return tokenizer.convert_ids_to_tokens([token_id])[0]
    return tokenizer.decode([token_id], skip_special_tokens=False)


def token_bytes(tokenizer: Tokenizer | None, token_id: int, text: str) -> list[int]:
    """The token's raw bytes (one byte for a byte-fallback token)."""
    if tokenizer is not None and token_id in tokenizer.byte_token_ids:
        return [int(text[3:5], 16)]  # "<0xE4>" -> [0xE4]
    return list(text.encode())


def chat_logprobs(
    tokenizer: Tokenizer | None,
    token_ids: list[int],
    entries: list[dict[int, float]],
    top_n: int,
) -> ChoiceLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
        text = token_text(tokenizer, token_id)
        content.append(
            TokenLogprob(
                token=text,
                logprob=max(entry[token_id], -9999.0),
                bytes=token_bytes(tokenizer, token_id, text),
                top_logprobs=[
                    TopLogprob(
                        token=(t := token_text(tokenizer, tid)),
                        logprob=max(lp, -9999.0),
                        bytes=token_bytes(tokenizer, tid, t),
                    )
                    for tid, lp in ranked
                ],
            )
        )
    return ChoiceLogprobs(content=content)


def completion_logprobs(
    tokenizer: Tokenizer | None,
    token_ids: list[int],
    entries: list[dict[int, float] | None],
    top_n: int,
    text_offset_start: int = 0,
) -> CompletionLogprobs:
    """The legacy logprobs object. A None entry (the first prompt token, echoed) has a null
    logprob and null top_logprobs, as OpenAI and vLLM return it."""
    out = CompletionLogprobs()
    offset = text_offset_start
    for token_id, entry in zip(token_ids, entries, strict=False):
        text = token_text(tokenizer, token_id)
        out.tokens.append(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            out.token_logprobs.append(max(entry[token_id], -9999.0))
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
            out.top_logprobs.append(
                {token_text(tokenizer, t): max(lp, -9999.0) for t, lp in ranked}
            )
        out.text_offset.append(offset)
        offset += len(text)
    return out


def prompt_logprobs_field(
    tokenizer: Tokenizer | None,
    token_ids: list[int],
    entries: list[dict[int, float] | None],
    top_n: int,
) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token_id: Logprob} of
    its top `top_n` (ranks 1..top_n) and the prompt token itself (unranked outside them)."""
    out: list[dict[int, PromptLogprob] | None] = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        if entry is None:
            out.append(None)
            continue
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
        field = {
            t: PromptLogprob(
                logprob=max(lp, -9999.0), rank=rank, decoded_token=token_text(tokenizer, t)
            )
            for rank, (t, lp) in enumerate(ranked, start=1)
        }
        if token_id not in field:
            field[token_id] = PromptLogprob(
                logprob=max(entry[token_id], -9999.0),
                decoded_token=token_text(tokenizer, token_id),
            )
        out.append(field)
    return out


def requested_prompt_logprobs(
    tokenizer: Tokenizer | None,
    top_n: int | None,
    token_ids: list[int],
    entries: list[dict[int, float] | None] | None,
) -> list[dict[int, PromptLogprob] | None] | None:
    """The `prompt_logprobs` field of a response: None when the request did not ask (`top_n`
    None) or the engine output holding the prompt's entries has not come."""
    if top_n is None or entries is None:
        return None
    return prompt_logprobs_field(tokenizer, token_ids, entries, top_n)
