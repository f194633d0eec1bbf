"""Sampler: turns one step's logits [B, V] into one token per request, plus logprobs.

Data path: raw logits -> logprobs (raw) ; working copy -> logit bias -> penalties ->
min_tokens mask -> greedy argmax | temperature -> top-k/top-p -> softmax -> min-p ->
exponential race. (A grammar bitmask, when a step has one, is applied before all of it.)
Every decision (which rows, which stage, how many candidates) is taken on the host from the
`SamplingParams`; the per-row parameters reach the device as ONE packed copy (none for an
all-greedy batch without penalties, min_tokens or a logprobs subset), and nothing is read
back until `SamplerOutput.to_host`, the step's one device->host copy. Never mutates the
logits it is given or any `SamplingState`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ernie_cluster.sample.logprobs import Logprobs, TokenLogprobs
from ernie_cluster.sample.penalties import LogitBias, MinTokens, Penalties
from ernie_cluster.sample.sampling_state import SamplingState
from ernie_cluster.sample.top_k_top_p import TopKTopP, apply_min_p
from ernie_cluster.worker.step_upload import Slot, StepUpload

# NOTE: below this, logits / temperature can overflow float32 and softmax turns into NaN;
# such temperatures are indistinguishable from greedy anyway.
_MIN_TEMPERATURE = 1e-5


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B] int64 index of each row's first maximum, as argmax. NOTE: on CPU
    torch.max(dim) returns the same index 2.5x faster than argmax at vocabulary widths."""
    return x.max(dim=-1).indices if x.device.type == "cpu" else x.argmax(dim=-1)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor
    """[B] int64 on the logits' device, one sampled token per row in `states` order; a
    standalone contiguous tensor (the runner broadcasts it to the other ranks)."""
    logprobs: Logprobs | None = None
    """Which rows asked for logprobs and how many (host); None: no row did."""
    top_logprob_ids: torch.Tensor | None = None
    """[L, K] int64 the asking rows' most likely token ids, K = `logprobs.max_top`."""
    top_logprobs: torch.Tensor | None = None
    """[L, K] float32 their raw logprobs, descending."""
    sampled_logprobs: torch.Tensor | None = None
    """[L] float32 raw logprob of each asking row's sampled token."""
    generator_states: dict[int, torch.Tensor] = field(default_factory=dict)
    """Batch row -> its generator's state right after that row's draw, for seeded generators
    that drew for several rows (a speculative sequence's positions): the worker rewinds a
    generator to the state after the last row it keeps (host tensors; no device read)."""

    def to_host(self) -> tuple[list[int], list[TokenLogprobs | None]]:
        """The one device->host copy of the step: the token ids and, per row, None or
        {token_id: logprob} of its top-`params.logprobs` tokens plus the sampled token (most
        likely first, the sampled token last if not a top one), from the raw logits."""
        num_rows = self.token_ids.shape[0]
        if self.logprobs is None:
            return self.token_ids.tolist(), [None] * num_rows
        assert self.top_logprob_ids is not None and self.top_logprobs is not None
        assert self.sampled_logprobs is not None
        parts = (self.token_ids, self.sampled_logprobs, self.top_logprob_ids, self.top_logprobs)
        # NOTE: float64 holds token ids (< 2**53) and float32 logprobs exactly, so one packed
        # tensor carries everything in a single transfer.
        values = torch.cat([p.reshape(-1).to(torch.float64) for p in parts]).tolist()
        num_asking = self.sampled_logprobs.shape[0]
        num_top_values = self.top_logprobs.numel()
        token_ids = [int(t) for t in values[:num_rows]]
        sampled = values[num_rows : num_rows + num_asking]
        top = values[num_rows + num_asking :]
        entries = self.logprobs.to_entries(
            token_ids, top[:num_top_values], top[num_top_values:], sampled
        )
        return token_ids, entries


class Sampler:
    """Stateless; all per-request state lives in the `SamplingState`s passed per call."""

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits must be [num_states={len(states)}, vocab], got {tuple(logits.shape)}"
            )
        vocab_size, device = logits.shape[1], logits.device
        upload = StepUpload()
        bias = LogitBias.plan(states, vocab_size, upload)
        penalties = Penalties.plan(states, vocab_size, device, upload)
        min_tokens = MinTokens.plan(states, vocab_size, upload)
        sampling = _RandomRows.plan(states, vocab_size, upload)
        logprobs = Logprobs.plan(states, vocab_size, upload)
        upload.send(device)

        working = logits
        if bias is not None or penalties is not None or min_tokens is not None:
            working = logits.clone(memory_format=torch.contiguous_format)  # [B, V]
            if bias is not None:
                bias.apply(working, upload)
            if penalties is not None:
                penalties.apply(working, upload)
            if min_tokens is not None:
                min_tokens.apply(working, upload)

        # [B] greedy rows take the argmax, sampling rows their draw
        states: dict[int, torch.Tensor] = {}
        if sampling is None:
            token_ids = first_argmax(working)
        else:
            token_ids = sampling.sample(working, upload, states)
        if logprobs is None:
            return SamplerOutput(token_ids, generator_states=states)
        gathered = logprobs.gather(logits, token_ids, upload)
        return SamplerOutput(token_ids, logprobs, *gathered, generator_states=states)


@dataclass(frozen=True)
class _RandomRows:
    """Host plan of the rows that sample (temperature > 0); the others take the argmax."""

    rows: Slot | None
    """[R] batch rows that sample; None: every row."""
    temperature: Slot
    """[R]"""
    truncation: TopKTopP | None
    min_p: Slot | None
    """[R]; None when no row uses min-p."""
    generators: list[torch.Generator | None]
    """[R] each row's private generator; None draws from torch's default."""
    unseeded: Slot | None
    """[U] positions (among the R) of the rows without a generator, when 0 < U < R."""
    batch_rows: list[int]
    """[R] the batch row of each sampling row (host)."""

    @classmethod
    def plan(
        cls, states: list[SamplingState], vocab_size: int, upload: StepUpload
    ) -> _RandomRows | None:
        rows = [i for i, s in enumerate(states) if s.params.temperature >= _MIN_TEMPERATURE]
        if not rows:
            return None
        params = [states[i].params for i in rows]
        generators = [states[i].generator for i in rows]
        unseeded = [j for j, g in enumerate(generators) if g is None]
        min_p = [p.min_p for p in params]
        return cls(
            rows=None if len(rows) == len(states) else upload.ints(rows),
            temperature=upload.floats([p.temperature for p in params]),
            truncation=TopKTopP.plan(
                [p.top_k for p in params], [p.top_p for p in params], vocab_size, upload
            ),
            min_p=upload.floats(min_p) if any(m > 0.0 for m in min_p) else None,
            generators=generators,
            unseeded=upload.ints(unseeded) if 0 < len(unseeded) < len(rows) else None,
            batch_rows=rows,
        )

    def sample(
        self, logits: torch.Tensor, upload: StepUpload, states: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """[B] the argmax of `logits` [B, V], with the sampling rows' draws in their place;
        fills `states` (SamplerOutput.generator_states)."""
        rows = None if self.rows is None else upload[self.rows]  # [R]
        sub = logits if rows is None else logits.index_select(0, rows)  # [R, V]
        temperature = upload[self.temperature].to(sub.dtype)  # [R]
        scaled = sub / temperature.unsqueeze(1)  # [R, V] fresh copy, safe to edit
        if self.truncation is not None:
            self.truncation.apply(scaled, upload)
        probs = scaled.softmax(dim=-1)  # [R, V]
        if self.min_p is not None:
            apply_min_p(probs, upload[self.min_p])
        noise = self._exponential_noise(probs.shape[1], probs.dtype, probs.device, upload, states)
        # NOTE: argmax(p / E) with E ~ Exp(1) picks token t with probability p_t (the
        # exponential race), so the noise draw alone decides the token: no cumsum/multinomial.
        sampled = first_argmax(probs.div_(noise))  # [R]
        if rows is None:
            return sampled
        return first_argmax(logits).index_copy_(0, rows, sampled)

    def _exponential_noise(
        self,
        vocab_size: int,
        dtype: torch.dtype,
        device: torch.device,
        upload: StepUpload,
        states: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        """[R, V] Exp(1) noise: one V-sized draw per seeded row from its own generator, so its
        token does not depend on batch composition; unseeded rows share one default-RNG draw."""
        num_rows = len(self.generators)
        seeded = [j for j, g in enumerate(self.generators) if g is not None]
        # NOTE: uniform draws turned into Exp(1) by -log(1 - u) (inverse CDF), in place: 3-6x
        # faster on CPU than Tensor.exponential_, which dominated a sampled step at large B x V.
        if not seeded:
            noise = torch.rand(num_rows, vocab_size, dtype=dtype, device=device)  # [R, V]
        else:
            noise = torch.empty(num_rows, vocab_size, dtype=dtype, device=device)
            if self.unseeded is not None:
                unseeded = upload[self.unseeded]  # [U]
                draw = torch.rand(self.unseeded.size, vocab_size, dtype=dtype, device=device)
                noise.index_copy_(0, unseeded, draw)
            draws = Counter(id(self.generators[j]) for j in seeded)
            for j in seeded:
                generator = self.generators[j]
                noise[j].uniform_(generator=generator)
                if draws[id(generator)] > 1:  # the rows of one speculative sequence
                    states[self.batch_rows[j]] = generator.get_state()
        noise.neg_().log1p_().neg_()
        # NOTE: an Exp(1) draw can be exactly 0; dividing by it would let a zero-probability
        # (truncated) token win via 0/0 = NaN or p/0 = inf.
        return noise.clamp_min_(torch.finfo(dtype).tiny)
