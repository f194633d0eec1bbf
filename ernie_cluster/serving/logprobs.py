"""Engine logprobs ({token_id: logprob} per generated token) in the two OpenAI shapes."""

from __future__ import annotations

from ernie_cluster.serving.protocol import (
    ChoiceLogprobs,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
)
from ernie_cluster.tokenizer import Tokenizer


def token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


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
                bytes=list(text.encode()),
                top_logprobs=[
                    TopLogprob(
                        token=(t := token_text(tokenizer, tid)),
                        logprob=max(lp, -9999.0),
                        bytes=list(t.encode()),
                    )
                    for tid, lp in ranked
                ],
            )
        )
    return ChoiceLogprobs(content=content)


def completion_logprobs(
    tokenizer: Tokenizer | None,
    token_ids: list[int],
    entries: list[dict[int, float]],
    top_n: int,
    text_offset_start: int = 0,
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset = text_offset_start
    for token_id, entry in zip(token_ids, entries, strict=False):
        text = token_text(tokenizer, token_id)
        out.tokens.append(text)
        out.token_logprobs.append(max(entry[token_id], -9999.0))
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
        out.top_logprobs.append({token_text(tokenizer, t): max(lp, -9999.0) for t, lp in ranked})
        out.text_offset.append(offset)
        offset += len(text)
    return out
