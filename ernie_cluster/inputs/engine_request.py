"""EngineRequest: one request resolved and validated, ready for the engine (neutral type).

Built only by the `InputProcessor`; the engine trusts it and checks nothing again. Plain data,
cheap to pickle from the HTTP ingress to a model replica.
"""

from __future__ import annotations

from dataclasses import dataclass

from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.structured_output.params import GrammarSpec


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    prompt_text: str | None
    """The prompt as text when it was given as text (echoed back in outputs)."""
    params: SamplingParams
    max_tokens: int
    """`params.max_tokens` resolved against max_model_len."""
    stop_token_ids: frozenset[int]
    """Ids that end each sample: eos unless `ignore_eos`, plus `params.stop_token_ids`."""
    grammar: GrammarSpec | None = None
    priority: int = 0
    answer_start_token_id: int | None = None
    """With a reasoning parser, the `<response>` token: stop strings apply only to the answer
    after it (not to the reasoning nor to the layout around it). None: to the whole output."""
