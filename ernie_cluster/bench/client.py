"""The load generator's contact with a server: one streamed OpenAI request, timed, plus the
`/v1/models` calls that find the served model and wait for a server to come up.

Speaks plain HTTP + server-sent events (httpx), so it measures any OpenAI-compatible server
the same way and sees every status code. Time to first token is the first chunk that
carries output (text, reasoning or a tool call); inter-token latencies are the gaps between
such chunks (a chunk that merges several tokens counts once, as in the other servers'
benchmarks); token counts come from the final usage chunk (`stream_options.include_usage`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from ernie_cluster.bench.datasets import BenchRequest

SESSION_HEADER = "x-session-id"
REPLICA_HEADER = "x-ernie-replica"


@dataclass
class RequestSettings:
    """Per-run request fields shared by every request."""

    base_url: str
    model: str
    chat: bool = True
    temperature: float = 0.0
    ignore_eos: bool = False
    api_key: str | None = None
    timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        path = "/v1/chat/completions" if self.chat else "/v1/completions"
        return self.base_url.rstrip("/") + path


@dataclass
class RequestResult:
    """Timings and outcome of one request; times are seconds since the run started."""

    session_id: str | None
    turn: int
    start: float
    max_tokens: int = 0
    ok: bool = False
    status: str = ""
    error: str = ""
    ttft: float | None = None
    end: float | None = None
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    replica: str | None = None
    text: str = ""
    reasoning: str = ""

    @property
    def answer(self) -> str:
        """What a conversation carries forward: the content, else the reasoning."""
        return self.text or self.reasoning

    @property
    def e2el(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if not self.ok or self.ttft is None or self.end is None or self.output_tokens < 2:
            return None
        return (self.end - self.start - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        """The timings and counts (not the answer's text)."""
        data = asdict(self)
        del data["text"], data["reasoning"]
        data["e2el"] = self.e2el
        data["tpot"] = self.tpot
        return data


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def models_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/v1/models"


def served_model(base_url: str, api_key: str | None) -> str:
    """The first model `base_url` serves; ValueError when it cannot say."""
    url = models_url(base_url)
    try:
        response = httpx.get(url, headers=auth_headers(api_key), timeout=30)
    except httpx.TransportError as exc:
        raise ValueError(f"cannot reach {url}: {exc!r}") from exc
    if response.status_code != 200:
        raise ValueError(f"GET {url} answered {response.status_code}: {response.text[:300]}")
    models = response.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url} serves no model")
    return models[0]["id"]


def wait_until_serving(
    base_url: str,
    api_key: str | None,
    timeout_s: float,
    alive: Callable[[], bool] = lambda: True,
    period_s: float = 0.5,
) -> str | None:
    """Poll `/v1/models` until it answers 200. None once it does; else, when `timeout_s`
    passes or `alive()` turns False, the last thing it saw."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline and alive():
        try:
            response = httpx.get(models_url(base_url), headers=auth_headers(api_key), timeout=10)
            if response.status_code == 200:
                return None
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(period_s)
    return last if alive() else f"the server exited ({last})"


def request_body(request: BenchRequest, settings: RequestSettings) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": settings.model,
        "max_tokens": request.max_tokens,
        "temperature": settings.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        **settings.extra_body,
    }
    if settings.ignore_eos:
        body["ignore_eos"] = True
    if settings.chat:
        if request.messages is None:
            raise ValueError("the chat endpoint needs messages; this request has a prompt")
        body["messages"] = request.messages
    else:
        if request.prompt is None:
            raise ValueError("the completions endpoint needs a prompt; this request has messages")
        body["prompt"] = request.prompt
    return body


def chunk_text(chunk: dict[str, Any], chat: bool) -> tuple[bool, str, str]:
    """(whether the chunk carries output, the text it adds, the reasoning it adds)."""
    has_output, text, reasoning = False, "", ""
    for choice in chunk.get("choices") or []:
        if not chat:
            piece = choice.get("text") or ""
            has_output |= bool(piece)
            text += piece
            continue
        delta = choice.get("delta") or {}
        content = delta.get("content") or ""
        thought = delta.get("reasoning_content") or ""
        has_output |= bool(content or thought or delta.get("tool_calls"))
        text += content
        reasoning += thought
    return has_output, text, reasoning


def error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return body[:500].decode("utf-8", "replace")


async def send_request(
    http: httpx.AsyncClient, request: BenchRequest, settings: RequestSettings, t0: float
) -> RequestResult:
    """Send `request`, stream the answer, and time it against the run's start `t0`."""
    headers = auth_headers(settings.api_key)
    if request.session_id:
        headers[SESSION_HEADER] = request.session_id
    body = request_body(request, settings)
    start = time.perf_counter()
    result = RequestResult(
        session_id=request.session_id,
        turn=request.turn,
        start=start - t0,
        max_tokens=request.max_tokens,
    )
    last_output_at: float | None = None
    finished_at: float | None = None
    done = False
    try:
        async with http.stream(
            "POST", settings.url, json=body, headers=headers, timeout=settings.timeout_s
        ) as response:
            result.replica = response.headers.get(REPLICA_HEADER)
            if response.status_code != 200:
                result.status = str(response.status_code)
                result.error = error_message(await response.aread())
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]
                    message = error.get("message", error) if isinstance(error, dict) else error
                    result.status, result.error = "stream_error", str(message)[:500]
                    return result
                has_output, text, reasoning = chunk_text(chunk, settings.chat)
                if has_output:
                    now = time.perf_counter()
                    if last_output_at is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last_output_at)
                    last_output_at = now
                    result.text += text
                    result.reasoning += reasoning
                if finished_at is None and any(
                    c.get("finish_reason") for c in chunk.get("choices") or []
                ):
                    finished_at = time.perf_counter()
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = int(details.get("cached_tokens") or 0)
    except httpx.TimeoutException as exc:
        result.status, result.error = "timeout", repr(exc)
        return result
    except httpx.TransportError as exc:
        result.status, result.error = "connection", repr(exc)
        return result
    except (ValueError, TypeError, AttributeError) as exc:  # not the OpenAI stream format
        result.status, result.error = "bad_response", repr(exc)[:500]
        return result
    finally:
        result.end = time.perf_counter() - t0
    if not done:
        result.status, result.error = "incomplete", "the stream ended without [DONE]"
        return result
    if result.ttft is None:
        if not (result.output_tokens and finished_at is not None):
            result.status, result.error = "no_output", "the response carried no output token"
            return result
        # NOTE: tokens that decode to no text (special tokens, a random model's output) are
        # streamed as nothing; the chunk that finishes the answer bounds the first token.
        result.ttft = finished_at - start
    result.ok, result.status = True, "200"
    return result
