"""SamplingState: the per-request sampling history the worker keeps across steps.

Owns the stop-id set, the request's private random generator and the prompt/output token
history that penalties read. The sampler only reads a state; the worker appends each sampled
token to `output_token_ids` after a step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ernie_cluster.sampling_params import SamplingParams

# NOTE: an odd 64-bit constant (the golden ratio) so `seed + i * C mod 2**64` is a bijection in
# i: the n children of one seeded request never share a generator seed.
_SEED_STRIDE = 0x9E3779B97F4A7C15
_SEED_MODULUS = 2**64


def derive_seed(seed: int, sample_index: int) -> int:
    """Generator seed of child `sample_index` of a seeded request; index 0 keeps `seed`.

    Reduced modulo 2**64, which is the range `torch.Generator.manual_seed` accepts and maps
    negative seeds onto, so any Python int the user sends is usable.
    """
    return (seed + sample_index * _SEED_STRIDE) % _SEED_MODULUS


@dataclass
class SamplingState:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    """Grows by one token per step; appended by the worker, never by the sampler."""
    stop_token_ids: frozenset[int]
    """Ids that end generation: eos (unless `ignore_eos`) plus `params.stop_token_ids`."""
    generator: torch.Generator | None
    """Private noise source when `params.seed` is set; None draws from torch's default."""
    prompt_ids_tensor: torch.Tensor | None = field(default=None, repr=False, compare=False)
    """[prompt_len] int64 copy of the prompt, kept so repetition penalty does not rebuild it
    from the Python list every step; None when unused (the sampler then builds it)."""

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: Iterable[int],
        eos_token_ids: Iterable[int],
        sample_index: int = 0,
        device: torch.device | str = "cpu",
    ) -> SamplingState:
        prompt = [int(t) for t in prompt_token_ids]
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(derive_seed(params.seed, sample_index))
        prompt_ids_tensor = None
        if params.repetition_penalty != 1.0:
            prompt_ids_tensor = torch.tensor(prompt, dtype=torch.int64, device=device)
        return cls(
            params=params,
            prompt_token_ids=prompt,
            output_token_ids=[],
            stop_token_ids=params.resolve_stop_token_ids(eos_token_ids),
            generator=generator,
            prompt_ids_tensor=prompt_ids_tensor,
        )

    @property
    def is_min_tokens_pending(self) -> bool:
        """True while stop ids must stay masked because `min_tokens` is not reached yet."""
        return len(self.output_token_ids) < self.params.min_tokens and bool(self.stop_token_ids)
