"""InputProcessor: the one path from a prompt and its parameters to an `EngineRequest`.

Chat, completions and `LLM` all come through here, so every rule about a request's inputs is
written once: tokenizing text or checking ids against the vocabulary, the sampling fields the
request left to the checkpoint's generation_config.json, the room left for max_tokens, the
stop set, logit-bias ids and the output constraint. Each problem is an
`InputError` naming the parameter; the engine accepts what comes out without re-checking.
"""

from __future__ import annotations

from ernie_cluster.inputs.engine_request import EngineRequest
from ernie_cluster.inputs.errors import InputError
from ernie_cluster.inputs.model_facts import ModelFacts
from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.structured_output.formats import params_format
from ernie_cluster.structured_output.params import GrammarSpec
from ernie_cluster.tokenizer import Tokenizer

Prompt = str | list[int]


class InputProcessor:
    def __init__(self, facts: ModelFacts, tokenizer: Tokenizer | None) -> None:
        self.facts = facts
        self.tokenizer = tokenizer

    @property
    def max_model_len(self) -> int:
        return self.facts.max_model_len

    # ------------------------------------------------------------------------- prompts
    def tokenize(self, prompt: Prompt, param: str = "prompt") -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a text or token-id prompt."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError(
                    "this checkpoint has no tokenizer files: give prompts as token ids",
                    param=param,
                )
            self.check_text_size(len(prompt), param)
            try:
                return prompt, self.tokenizer.encode(prompt)
            except (TypeError, ValueError) as exc:  # e.g. a lone surrogate
                raise InputError(f"cannot tokenize the {param}: {exc}", param=param) from exc
        token_ids = [int(t) for t in prompt]
        self.check_token_ids(token_ids, param)
        return None, token_ids

    def check_text_size(self, num_chars: int, param: str) -> None:
        """Refuse a text too long to fit in max_model_len before spending time tokenizing it
        (no token is longer than the tokenizer's longest token string)."""
        if self.tokenizer is None:
            return
        per_token = self.tokenizer.max_token_chars
        limit = self.facts.max_model_len * per_token
        if num_chars > limit:
            raise InputError(
                f"the {param} has {num_chars} characters, more than max_model_len "
                f"({self.facts.max_model_len} tokens of at most {per_token} characters) holds",
                param=param,
                code="context_length_exceeded",
            )

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        vocab = self.facts.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InputError(
                f"token id {bad} in {param} is outside the vocabulary [0, {vocab})", param=param
            )

    # ----------------------------------------------------------------------- the request
    def process(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        constrain_after_reasoning: bool = False,
        prompt_param: str = "prompt",
    ) -> EngineRequest:
        """One engine request. `constrain_after_reasoning`: the output constraint (if any) and
        the stop strings start once the model has closed its reasoning with `</think>`."""
        params = (params or SamplingParams()).with_model_defaults(self.facts.default_sampling)
        text, token_ids = self.tokenize(prompt, prompt_param)
        max_tokens = self.resolve_max_tokens(len(token_ids), params.max_tokens, prompt_param)
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        if params.logit_bias:
            self.check_token_ids(list(params.logit_bias), "logit_bias")
        return EngineRequest(
            request_id=request_id,
            prompt_token_ids=token_ids,
            prompt_text=text,
            params=params,
            max_tokens=max_tokens,
            stop_token_ids=params.resolve_stop_token_ids(self.facts.eos_token_ids),
            grammar=self._grammar(params, constrain_after_reasoning),
            priority=priority,
            answer_start_token_id=self.facts.answer_start_token_id
            if constrain_after_reasoning
            else None,
        )

    def resolve_max_tokens(
        self, num_prompt_tokens: int, requested: int | None, prompt_param: str = "prompt"
    ) -> int:
        limit = self.facts.max_model_len
        if num_prompt_tokens == 0:
            raise InputError(
                f"the {prompt_param} is empty: give at least one token", param=prompt_param
            )
        # NOTE: max_tokens = 0 (prompt logprobs only) needs no room past the prompt.
        if num_prompt_tokens > limit or (num_prompt_tokens == limit and requested != 0):
            raise InputError(
                f"the {prompt_param} has {num_prompt_tokens} tokens but max_model_len is "
                f"{limit}: no room to generate",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if requested is None:
            return limit - num_prompt_tokens
        if num_prompt_tokens + requested > limit:
            raise InputError(
                f"this model's maximum context length is {limit} tokens, but the request has "
                f"{num_prompt_tokens} prompt tokens and asks for {requested} completion tokens "
                f"({num_prompt_tokens + requested} in total)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    def _grammar(self, params: SamplingParams, after_reasoning: bool) -> GrammarSpec | None:
        constraint = params.structured_outputs
        if constraint is None:
            return None
        if self.tokenizer is None:
            raise InputError(
                "structured outputs need a checkpoint with a tokenizer",
                param="structured_outputs",
            )
        if params.min_tokens > 0:
            raise InputError(
                "min_tokens cannot be combined with a structured output: the constraint "
                "decides when the output is complete",
                param="min_tokens",
            )
        start = None
        if after_reasoning:
            start = self.facts.reasoning_end_token_id
            if start is None:
                raise InputError(
                    "the reasoning parser needs a </think> token, which this tokenizer lacks",
                    param="structured_outputs",
                )
        return GrammarSpec.from_format(params_format(constraint, "structured_outputs"), start)
