"""History-dependent logit edits: repetition/frequency/presence penalties and min_tokens.

Both are planned on the host from the `SamplingState`s (which rows, which token ids) and
applied in place to a working copy of the logits, touching only the rows that ask for them.
Penalties gather the logits of the tokens a row has seen ([rows, L] id blocks padded with -1),
edit them and scatter them back, so their cost grows with the history, not the vocabulary; a
prompt already on the device (`prompt_ids_tensor`) is read there. Never samples, never mutates
a `SamplingState`, never reads a device tensor back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from ernie_cluster.sample.sampling_state import SamplingState, has_penalties
from ernie_cluster.worker.step_upload import Slot, StepUpload


@dataclass(frozen=True)
class Penalties:
    """Host plan of a batch's penalties; `apply` runs it on the device."""

    rows: Slot | None
    """[P] rows with a penalty; None: every row."""
    num_rows: int
    output_ids: Slot | None
    """[P, Lo] output token ids per row, -1 padded, uploaded; None: none uploaded (no row has
    output yet, or every row's outputs are on the device already)."""
    outputs_on_device: tuple[torch.Tensor, ...]
    """[P] per row its output ids kept on the device (sampling_state.record_sampled); empty
    when uploaded or absent."""
    repetition: Slot | None
    """[P] repetition penalties; None when no row has one (the same for the two below)."""
    frequency: Slot | None
    presence: Slot | None
    prompts_on_device: tuple[torch.Tensor, ...]
    """[P] per row its prompt ids on the device (empty where absent or not needed)."""
    prompt_ids: Slot | None
    """[P, Lp] prompt ids of repetition rows whose prompt is not on the device, -1 padded."""

    @classmethod
    def plan(
        cls,
        states: list[SamplingState],
        vocab_size: int,
        device: torch.device,
        upload: StepUpload,
    ) -> Penalties | None:
        """Plan for the rows whose params enable a penalty; None when no row has one."""
        rows = [i for i, state in enumerate(states) if has_penalties(state.params)]
        if not rows:
            return None
        picked = [states[i] for i in rows]
        repetition = [s.params.repetition_penalty for s in picked]
        frequency = [s.params.frequency_penalty for s in picked]
        presence = [s.params.presence_penalty for s in picked]

        empty = torch.empty(0, dtype=torch.int64, device=device)
        on_device = [empty] * len(picked)
        host_prompts: list[list[int]] = [[] for _ in picked]
        for j, state in enumerate(picked):
            if repetition[j] == 1.0:
                continue
            cached = state.prompt_ids_tensor
            if cached is not None and cached.device == device:
                on_device[j] = cached
            else:
                host_prompts[j] = state.prompt_token_ids
        prompt_ids = _padded(host_prompts, vocab_size)  # [P, Lp] or None
        kept = [s.output_ids_on(device) for s in picked]
        outputs_on_device: tuple[torch.Tensor, ...] = ()
        output_ids = None
        if all(t is not None for t in kept):  # no upload: the history lives on the device
            if any(t.numel() for t in kept):
                outputs_on_device = tuple(kept)
        else:
            output_ids = _padded([s.output_token_ids for s in picked], vocab_size)  # [P, Lo]
        if any(r != 1.0 for r in repetition):
            has_seen = np.array(
                [
                    t.numel() > 0 or len(s.output_token_ids) > 0
                    for t, s in zip(on_device, picked, strict=True)
                ]
            )
            for block in (prompt_ids, output_ids):
                if block is not None:
                    has_seen |= (block >= 0).any(axis=1)
            # NOTE: a row that has seen nothing gets 1.0, which leaves the stand-in id its
            # padding gathers (0) unpenalised.
            repetition = [r if seen else 1.0 for r, seen in zip(repetition, has_seen, strict=True)]
        uses_repetition = any(r != 1.0 for r in repetition)
        if uses_repetition and prompt_ids is not None:
            prompt_slot = upload.ints(prompt_ids.reshape(-1))
        else:
            prompt_slot = None
        return cls(
            rows=None if len(rows) == len(states) else upload.ints(rows),
            num_rows=len(rows),
            output_ids=None if output_ids is None else upload.ints(output_ids.reshape(-1)),
            outputs_on_device=outputs_on_device,
            repetition=upload.floats(repetition) if uses_repetition else None,
            frequency=upload.floats(frequency) if any(f != 0.0 for f in frequency) else None,
            presence=upload.floats(presence) if any(p != 0.0 for p in presence) else None,
            prompts_on_device=(
                tuple(on_device) if uses_repetition and any(t.numel() for t in on_device) else ()
            ),
            prompt_ids=prompt_slot,
        )

    def apply(self, logits: torch.Tensor, upload: StepUpload) -> None:
        """Penalise `logits` [B, V] in place: repetition penalty (tokens seen in prompt or
        output) first, then the OpenAI frequency/presence terms over output tokens only."""
        rows = None if self.rows is None else upload[self.rows]  # [P]
        sub = logits if rows is None else logits.index_select(0, rows)  # [P, V]
        num_rows, vocab_size = sub.shape
        outputs = None
        if self.output_ids is not None:
            outputs = upload[self.output_ids].view(num_rows, -1)  # [P, Lo]
        elif self.outputs_on_device:
            kept = list(self.outputs_on_device)
            outputs = pad_sequence(kept, batch_first=True, padding_value=-1)  # [P, Lo]

        if self.repetition is not None:
            blocks = []  # [P, *] id blocks, -1 padded
            if self.prompts_on_device:
                blocks.append(
                    pad_sequence(list(self.prompts_on_device), batch_first=True, padding_value=-1)
                )
            if self.prompt_ids is not None:
                blocks.append(upload[self.prompt_ids].view(num_rows, -1))
            if outputs is not None:
                blocks.append(outputs)
            ids = _pad_with_seen_id(torch.cat(blocks, dim=1))  # [P, L]
            penalty = upload[self.repetition].to(sub.dtype).unsqueeze(1)  # [P, 1]
            seen = sub.gather(1, ids)  # [P, L]
            # NOTE: a token seen twice gathers the same logit twice, so both writes agree.
            sub.scatter_(1, ids, torch.where(seen > 0, seen / penalty, seen * penalty))

        if outputs is not None and (self.frequency is not None or self.presence is not None):
            spill = torch.where(outputs >= 0, outputs, vocab_size)  # [P, Lo] pads to column V
            counts = torch.zeros(num_rows, vocab_size + 1, dtype=sub.dtype, device=sub.device)
            counts.scatter_add_(1, spill, torch.ones_like(spill, dtype=sub.dtype))  # [P, V + 1]
            ids = _pad_with_seen_id(outputs)  # [P, Lo]
            count = counts.gather(1, ids)  # [P, Lo] occurrences of each output token
            edited = sub.gather(1, ids)  # [P, Lo]
            if self.frequency is not None:
                frequency = upload[self.frequency].to(sub.dtype).unsqueeze(1)  # [P, 1]
                edited -= frequency * count
            if self.presence is not None:
                presence = upload[self.presence].to(sub.dtype).unsqueeze(1)  # [P, 1]
                edited -= presence * (count > 0).to(sub.dtype)
            sub.scatter_(1, ids, edited)

        if rows is not None:
            logits.index_copy_(0, rows, sub)


@dataclass(frozen=True)
class MinTokens:
    """Host plan of the stop ids masked for rows that have not reached `min_tokens`."""

    flat_ids: Slot
    """Flat `row * V + stop_id` of every masked logit."""

    @classmethod
    def plan(
        cls, states: list[SamplingState], vocab_size: int, upload: StepUpload
    ) -> MinTokens | None:
        flat_ids = [
            i * vocab_size + t
            for i, state in enumerate(states)
            if state.is_min_tokens_pending
            # NOTE: user stop ids beyond the vocabulary can never be sampled; skip them.
            for t in state.stop_token_ids
            if t < vocab_size
        ]
        return cls(upload.ints(flat_ids)) if flat_ids else None

    def apply(self, logits: torch.Tensor, upload: StepUpload) -> None:
        """Set the stop-id logits of `logits` [B, V] (contiguous) to -inf in place."""
        logits.view(-1).index_fill_(0, upload[self.flat_ids], float("-inf"))


@dataclass(frozen=True)
class LogitBias:
    """Host plan of the rows' logit biases (OpenAI `logit_bias`)."""

    flat_ids: Slot
    """Flat `row * V + token_id` of every biased logit."""
    values: Slot

    @classmethod
    def plan(
        cls, states: list[SamplingState], vocab_size: int, upload: StepUpload
    ) -> LogitBias | None:
        flat_ids, values = [], []
        for i, state in enumerate(states):
            for token, bias in (state.params.logit_bias or {}).items():
                if token < vocab_size:
                    flat_ids.append(i * vocab_size + token)
                    values.append(bias)
        if not flat_ids:
            return None
        return cls(upload.ints(flat_ids), upload.floats(values))

    def apply(self, logits: torch.Tensor, upload: StepUpload) -> None:
        """Add the biases to `logits` [B, V] (contiguous) in place."""
        flat = logits.view(-1)
        flat.index_add_(0, upload[self.flat_ids], upload[self.values].to(logits.dtype))


def _padded(rows: list[list[int]], vocab_size: int) -> np.ndarray | None:
    """[P, L] the rows' token ids, -1 padded; ids past the vocabulary become padding too;
    None when there are none."""
    width = max(len(ids) for ids in rows)
    if width == 0:
        return None
    block = np.full((len(rows), width), -1, dtype=np.int64)
    for j, ids in enumerate(rows):
        block[j, : len(ids)] = ids
    block[block >= vocab_size] = -1
    return block


def _pad_with_seen_id(ids: torch.Tensor) -> torch.Tensor:
    """`ids` [P, L] with each -1 replaced by an id its row already holds (0 in a row of only
    padding), so gathering and scattering the padding repeats a real entry's edit."""
    return torch.where(ids >= 0, ids, ids.amax(dim=1, keepdim=True).clamp_min(0))
