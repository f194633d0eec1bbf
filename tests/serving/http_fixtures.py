"""Helpers of the HTTP serving tests: a live uvicorn server on 127.0.0.1 in a background thread,
and two test doubles that replay a scripted ERNIE output token by token.

- `LiveServer` runs any ASGI app on a free port and, at shutdown, awaits a cleanup coroutine
  (the engine's shutdown) in the server's own event loop.
- `ScriptedExecutor` stands in for the model only: the real scheduler, KV cache manager,
  detokenizer, stop handling and async engine run around it (`scripted_engine`).
- `ScriptedClient` stands in for the whole engine behind `EngineClient`.
Both pick each request's script with a function of its prompt token ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.distributed.process_group import free_port
from ernie_cluster.engine.async_engine import AsyncLLMEngine
from ernie_cluster.engine.llm_engine import LLMEngine
from ernie_cluster.inputs.engine_request import EngineRequest
from ernie_cluster.inputs.model_facts import ModelFacts
from ernie_cluster.outputs import CompletionOutput, RequestOutput
from ernie_cluster.serving.api import OpenAIServing
from ernie_cluster.serving.http_app import build_http_app
from ernie_cluster.serving.local_engine_client import LocalEngineClient
from ernie_cluster.serving.settings import ServingSettings
from ernie_cluster.step_io import ModelRunnerOutput, SchedulerOutput
from ernie_cluster.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
ERROR_FIELDS = {"message", "type", "param", "code"}

ScriptChooser = Callable[[list[int]], list[int]]


def tiny_engine_config(checkpoint: Path, **overrides: Any) -> EngineConfig:
    return EngineConfig(model=str(checkpoint), dtype="float32", show_progress=False, **overrides)


# ------------------------------------------------------------------------------- server
class LiveServer:
    """An ASGI app served by uvicorn on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app, on_shutdown: Callable[[], Any] | None = None) -> None:
        self.app = app
        self.on_shutdown = on_shutdown
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, attempts: int = 3) -> LiveServer:
        # NOTE: another process may take the free port before uvicorn binds it; try again.
        for _ in range(attempts):
            if self._try_start():
                return self
        raise RuntimeError(f"uvicorn did not start on {HOST}: {self._error!r}")

    def _try_start(self) -> bool:
        self.port = free_port(HOST)
        config = uvicorn.Config(
            self.app,
            host=HOST,
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=3,
        )
        self._server = server = uvicorn.Server(config)
        self._error = None

        async def main() -> None:
            try:
                await server.serve()
            finally:
                # NOTE: only a server that ran owns the cleanup; a failed bind is retried.
                if server.started and self.on_shutdown is not None:
                    await self.on_shutdown()

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # reported by start() / stop()
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if server.started:
                return True
            if not self._thread.is_alive():
                return False
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"uvicorn did not start within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                assert self._server is not None
                self._server.force_exit = True
                self._thread.join(STOP_TIMEOUT_S)
            alive = self._thread.is_alive()
            self._thread = None
            if alive:
                raise RuntimeError(f"the server thread on port {self.port} did not stop")

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


@dataclass
class Served:
    """A running server and what tests look at behind it."""

    server: LiveServer
    engine: AsyncLLMEngine | None
    tokenizer: Tokenizer | None
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def openai(self, api_key: str | None = None, **kwargs):
        from openai import OpenAI

        return OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=api_key or self.api_key or "unused",
            max_retries=0,
            timeout=60.0,
            **kwargs,
        )

    def http(self, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)


@contextlib.contextmanager
def serve_app(
    app, engine: AsyncLLMEngine | None, tokenizer: Tokenizer | None, api_key: str | None = None
) -> Iterator[Served]:
    """Serve `app`; at teardown stop uvicorn, then shut `engine` down in the server's loop."""
    shutdown = engine.shutdown if engine is not None else None
    with LiveServer(app, on_shutdown=shutdown) as server:
        yield Served(server, engine, tokenizer, api_key)


@contextlib.contextmanager
def serve_local(
    checkpoint: Path,
    engine_overrides: dict[str, Any] | None = None,
    **serving_kwargs: Any,
) -> Iterator[Served]:
    """The real engine on the tiny checkpoint behind `build_local_app`."""
    from ernie_cluster.serving.local_server import build_local_app

    config = tiny_engine_config(checkpoint, **(engine_overrides or {}))
    serving_kwargs.setdefault("served_model_names", ["tiny"])
    app, engine = build_local_app(config, **serving_kwargs)
    try:
        with serve_app(app, engine, engine.tokenizer, serving_kwargs.get("api_key")) as served:
            yield served
    except BaseException:
        if engine.is_healthy:  # the server never started: nothing shut the engine down
            asyncio.run(engine.shutdown())
        raise


# ----------------------------------------------------------------------------- scripts
def script_by_marker(
    tokenizer: Tokenizer, scripts: dict[str, str], default: str | None = None
) -> ScriptChooser:
    """Chooses the script whose key occurs in the decoded prompt (first match in dict order;
    `default`'s script when none does). Scripts are tokenized once, here."""
    encoded = {key: tokenizer.encode(text) for key, text in scripts.items()}

    def choose(prompt_token_ids: list[int]) -> list[int]:
        prompt = tokenizer.decode(prompt_token_ids, skip_special_tokens=False)
        for key, ids in encoded.items():
            if key in prompt:
                return ids
        if default is None:
            raise AssertionError(f"no script marker in the prompt {prompt[-80:]!r}")
        return encoded[default]

    return choose


@dataclass
class _ScriptedRequest:
    num_prompt_tokens: int
    script: list[int]
    wants_logprobs: bool
    num_output_tokens: int = 0


@dataclass
class ScriptedExecutor:
    """Executor double: each request samples the next token of its script, then eos forever.

    A request samples when its scheduled tokens reach the end of its known tokens (prompt +
    tokens sampled so far), exactly when a real model runner would.
    """

    choose: ScriptChooser
    eos_token_id: int
    num_kv_blocks: int = 256
    recovers_from_step_errors: bool = False
    """A failed step (a test replaces `execute_model`) kills the engine, as a dead rank does."""
    step_delay_s: float = 0.0
    """Time each step takes, as a model's forward would."""
    requests: dict[str, _ScriptedRequest] = field(default_factory=dict)
    num_steps: int = 0

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.num_steps += 1
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
        computed: dict[str, int] = {}
        for new in scheduler_output.new_requests:
            self.requests[new.req_id] = _ScriptedRequest(
                len(new.prompt_token_ids),
                self.choose(list(new.prompt_token_ids)),
                new.params.logprobs is not None,
            )
            computed[new.req_id] = new.num_computed_tokens
        for cached in scheduler_output.cached_requests:
            computed[cached.req_id] = cached.num_computed_tokens
        out = ModelRunnerOutput()
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            state = self.requests[req_id]
            known = state.num_prompt_tokens + state.num_output_tokens
            if computed[req_id] + num_scheduled < known:
                continue  # a prefill chunk that does not reach the end yet
            index = state.num_output_tokens
            token = state.script[index] if index < len(state.script) else self.eos_token_id
            state.num_output_tokens += 1
            out.sampled_token_ids[req_id] = [token]
            if state.wants_logprobs:
                out.logprobs[req_id] = [{token: 0.0}]
        return out

    def collective_rpc(self, method: str, *args, timeout: float | None = None) -> list:
        return [getattr(self, method)(*args)]

    def expert_load(self) -> torch.Tensor:
        return torch.zeros(0, 0, dtype=torch.long)

    def resident_parameter_bytes(self) -> dict[str, int]:
        return {"experts": 0, "other": 0}

    def check_health(self) -> None:
        """Never unhealthy."""

    def shutdown(self) -> None:
        self.requests.clear()


def scripted_engine(
    checkpoint: Path,
    scripts: dict[str, str],
    default: str | None = None,
    step_delay_s: float = 0.0,
    **overrides: Any,
) -> tuple[AsyncLLMEngine, ScriptedExecutor]:
    """The real AsyncLLMEngine on the tiny checkpoint's config and tokenizer, with the model
    replaced by a ScriptedExecutor."""
    tokenizer = load_tokenizer(checkpoint)
    assert tokenizer is not None and tokenizer.eos_token_id is not None
    executor = ScriptedExecutor(
        script_by_marker(tokenizer, scripts, default),
        tokenizer.eos_token_id,
        step_delay_s=step_delay_s,
    )
    engine = LLMEngine(
        tiny_engine_config(checkpoint, **overrides),
        executor_factory=lambda config, model_dir: executor,
    )
    return AsyncLLMEngine(engine), executor


def settings_for(
    tokenizer: Tokenizer, max_model_len: int = 4096, vocab_size: int = 512, **kwargs: Any
) -> ServingSettings:
    names = kwargs.pop("served_model_names", ["tiny"])
    facts = ModelFacts(
        vocab_size=vocab_size,
        max_model_len=max_model_len,
        eos_token_ids=frozenset(tokenizer.stop_token_ids_default()),
        reasoning_end_token_id=tokenizer.token_to_id("</think>"),
        answer_start_token_id=tokenizer.token_to_id("<response>"),
    )
    return ServingSettings(names, facts, tokenizer, **kwargs)


@contextlib.contextmanager
def serve_scripted_engine(
    checkpoint: Path,
    scripts: dict[str, str],
    default: str | None = None,
    engine_overrides: dict[str, Any] | None = None,
    step_delay_s: float = 0.0,
    max_waiting_requests: int | None = None,
    **settings_kwargs: Any,
) -> Iterator[Served]:
    """HTTP -> LocalEngineClient -> real AsyncLLMEngine -> ScriptedExecutor."""
    engine, _ = scripted_engine(
        checkpoint, scripts, default, step_delay_s, **(engine_overrides or {})
    )
    settings = settings_for(
        engine.tokenizer,
        max_model_len=engine.engine.max_model_len,
        vocab_size=engine.engine.model_config.vocab_size,
        **settings_kwargs,
    )
    client = LocalEngineClient(engine, max_waiting_requests)
    app = build_http_app(OpenAIServing(client, settings))
    with serve_app(app, engine, engine.tokenizer, settings.api_key) as served:
        yield served


class ScriptedClient:
    """EngineClient double: replays each request's script one token per output, then eos
    (finish_reason "stop"), or stops at max_tokens ("length")."""

    def __init__(self, tokenizer: Tokenizer, choose: ScriptChooser) -> None:
        self.tokenizer = tokenizer
        self.choose = choose
        self.eos_token_id = tokenizer.eos_token_id
        self.num_requests = 0

    async def generate(
        self, request: EngineRequest, session_key: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        self.num_requests += 1
        prompt_token_ids, params = request.prompt_token_ids, request.params
        request_id = request.request_id
        script = self.choose(list(prompt_token_ids))
        samples = [
            IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
            for _ in range(params.n)
        ]
        max_tokens = request.max_tokens
        for position in range(len(script) + 1):
            await asyncio.sleep(0)
            is_eos = position == len(script)
            token = self.eos_token_id if is_eos else script[position]
            is_last = is_eos or position + 1 >= max_tokens
            outputs = []
            for index, detokenizer in enumerate(samples):
                text = "" if is_eos else detokenizer.add_tokens([token])
                if is_last:
                    text += detokenizer.flush()
                outputs.append(
                    CompletionOutput(
                        index=index,
                        text=text,
                        token_ids=[token],
                        logprobs=[{token: 0.0}] if params.logprobs is not None else None,
                        finish_reason=("stop" if is_eos else "length") if is_last else None,
                        stop_reason=token if is_eos else None,
                    )
                )
            yield RequestOutput(
                request_id=request_id,
                prompt=None,
                prompt_token_ids=list(prompt_token_ids),
                outputs=outputs,
                finished=is_last,
            )
            if is_last:
                return

    async def generate_batch(
        self, requests: list[EngineRequest], session_key: str | None = None
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Each request's script in turn (a double: no interleaving to model)."""
        for index, request in enumerate(requests):
            async for output in self.generate(request, session_key):
                yield index, output

    async def check_health(self) -> None:
        """Always healthy."""

    async def get_stats(self) -> list[dict[str, Any]]:
        return []


@contextlib.contextmanager
def serve_scripted_client(
    checkpoint: Path, scripts: dict[str, str], default: str | None = None, **settings_kwargs
) -> Iterator[Served]:
    """HTTP -> ScriptedClient (no engine at all)."""
    tokenizer = load_tokenizer(checkpoint)
    assert tokenizer is not None
    client = ScriptedClient(tokenizer, script_by_marker(tokenizer, scripts, default))
    settings = settings_for(tokenizer, **settings_kwargs)
    app = build_http_app(OpenAIServing(client, settings))
    with serve_app(app, None, tokenizer, settings.api_key) as served:
        yield served


# ----------------------------------------------------------------------------- checks
def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The `error` object of an OpenAI error response, after checking status and shape."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    return error


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll `predicate` until it holds or `timeout_s` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
