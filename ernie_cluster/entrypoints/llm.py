"""LLM: offline generation from Python (`LLM(...).generate(...)` / `.chat(...)`).

A thin loop over `LLMEngine`: submit every prompt, step until all finish, return outputs in
prompt order. Signatures follow vLLM's so scripts move over unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.engine.llm_engine import LLMEngine, Prompt
from ernie_cluster.outputs import RequestOutput
from ernie_cluster.sampling_params import SamplingParams

Message = dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        if model is None:
            from ernie_cluster.checkpoints.demo import demo_checkpoint

            model = str(demo_checkpoint())
        known = set(EngineConfig.model_fields) - {"model"}
        unknown = sorted(set(engine_kwargs) - known)
        if unknown:
            raise TypeError(f"unknown LLM arguments {unknown}; valid: {sorted(known)}")
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for i, (request_id, prompt, params) in enumerate(
                zip(ids, prompts, params_list, strict=True)
            ):
                self.engine.add_request(
                    request_id, prompt, params, priority=priority[i] if priority else 0
                )
            return self._run(ids, use_tqdm)
        except BaseException:
            self.engine.abort_request(ids)
            raise

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        progress = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
                    progress.update(1)
        progress.close()
        return [finished[i] for i in ids]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [
            self.render_chat(conv, tools, chat_template_kwargs, add_generation_prompt)
            for conv in conversations  # type: ignore[union-attr]
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def render_chat(
        self,
        messages: list[Message],
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """The chat template applied and tokenized (special tokens parsed as themselves)."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer, so chat() is unavailable")
        text = self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **(chat_template_kwargs or {}),
        )
        return self.tokenizer.encode(text)

    def get_stats(self):
        return self.engine.get_stats()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
