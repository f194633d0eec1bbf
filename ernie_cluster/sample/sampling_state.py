"""SamplingState: the per-request sampling history the worker keeps across steps.

Owns the stop-id set (as the input processor resolved it), the request's private random
generator and the prompt/output token history that penalties read, on the host and, for
requests with penalties, on the device (the prompt uploaded once, pinned; the outputs
appended there from the sampled tokens, so no step re-uploads a history). The sampler only reads a state; the worker records each sampled
token after a step (`record_sampled`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.worker.step_upload import StepUpload

# NOTE: an odd 64-bit constant (the golden ratio) so `seed + i * C mod 2**64` is a bijection in
# i: the n children of one seeded request never share a generator seed.
_SEED_STRIDE = 0x9E3779B97F4A7C15
_SEED_MODULUS = 2**64


def has_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )


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
    output_ids_buffer: torch.Tensor | None = field(default=None, repr=False, compare=False)
    """[capacity] int64 on the device: `output_token_ids` as recorded by `record_sampled`,
    kept only for requests with penalties; None until the first record."""
    output_ids_kept: int = field(default=0, repr=False, compare=False)
    """How many outputs `output_ids_buffer` holds (a host count)."""

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: Iterable[int],
        stop_token_ids: Iterable[int],
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
            # NOTE: through a (pinned on CUDA) StepUpload: torch.tensor(list, device=cuda)
            # would copy from pageable memory and stall the step it arrives in.
            upload = StepUpload()
            slot = upload.ints(prompt)
            upload.send(torch.device(device))
            prompt_ids_tensor = (
                upload[slot] if prompt else torch.empty(0, dtype=torch.long, device=device)
            )
        return cls(
            params=params,
            prompt_token_ids=prompt,
            output_token_ids=[],
            stop_token_ids=frozenset(stop_token_ids),
            generator=generator,
            prompt_ids_tensor=prompt_ids_tensor,
        )

    @property
    def has_penalties(self) -> bool:
        return has_penalties(self.params)

    @property
    def is_min_tokens_pending(self) -> bool:
        """True while stop ids must stay masked because `min_tokens` is not reached yet."""
        return len(self.output_token_ids) < self.params.min_tokens and bool(self.stop_token_ids)

    def output_ids_on(self, device: torch.device) -> torch.Tensor | None:
        """[len(output_token_ids)] the outputs on `device` without an upload, or None when the
        device copy is not kept there (the caller uploads the host list)."""
        num = len(self.output_token_ids)
        if num == 0:
            return torch.empty(0, dtype=torch.long, device=device)
        buffer = self.output_ids_buffer
        if buffer is None or buffer.device != device or self.output_ids_kept != num:
            return None
        return buffer[:num]


def record_sampled(
    states: list[SamplingState],
    tokens: torch.Tensor,
    token_list: list[int],
    on_device: bool = True,
    rows: list[int] | None = None,
) -> None:
    """Append each state's sampled token: `token_list` [S] to the host histories and, when
    `on_device`, the same ids on the device (`tokens[rows[i]]`, rows default 0..S-1) to the
    device histories of the states with penalties, in one multi-tensor copy; a full buffer
    doubles (a device copy, no sync). A state may appear several times (accepted proposals),
    in order."""
    targets, sources = [], []
    rows = rows if rows is not None else list(range(len(states)))
    for i, state, token in zip(rows, states, token_list, strict=True):
        num = len(state.output_token_ids)
        state.output_token_ids.append(token)
        if not (on_device and state.has_penalties) or state.output_ids_kept != num:
            continue  # a history recorded elsewhere stays on the host (uploaded per step)
        buffer = state.output_ids_buffer
        if buffer is None or buffer.shape[0] == num:
            grown = torch.empty(max(16, 2 * num), dtype=torch.long, device=tokens.device)
            if buffer is not None:
                grown[:num].copy_(buffer[:num])
            buffer = state.output_ids_buffer = grown
        state.output_ids_kept = num + 1
        targets.append(buffer[num : num + 1])
        sources.append(tokens[i : i + 1])
    if targets:
        torch._foreach_copy_(targets, sources)
