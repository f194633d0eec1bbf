"""Time one `Sampler` call at B=256, V=32000: all-greedy, a mixed-parameter batch, and a
uniform batch (every row temperature 0.8, top-k 50, top-p 0.95, repetition penalty 1.1)
against transformers' own sampling path for the same settings in the same run (its logits
processors over the batch, softmax, `torch.multinomial`; transformers cannot mix settings
per row, so the mixed batch has no peer).

Run: `.venv/bin/python benchmarks/bench_sampler.py [--device cuda]`. Not collected by pytest;
it backs the per-call timings quoted for the sampler.
"""

from __future__ import annotations

import argparse
import random
import timeit

import torch

from ernie_cluster.sample import Sampler, SamplingState
from ernie_cluster.sampling_params import SamplingParams

BATCH, VOCAB, PROMPT_LEN, OUTPUT_LEN = 256, 32000, 1000, 100


def mixed_params(i: int) -> SamplingParams:
    """Cycle through the parameter mixes a serving batch sees."""
    return [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.0, top_k=50, seed=i),
        SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, logprobs=5),
        SamplingParams(temperature=1.0, repetition_penalty=1.1, presence_penalty=0.5),
        SamplingParams(
            temperature=0.6, frequency_penalty=0.3, seed=i, min_tokens=200, max_tokens=None
        ),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, logprobs=1),
    ][i % 8]


UNIFORM = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1}


def transformers_sampler(states: list[SamplingState], device: str):
    """transformers' `generate` sampling step for UNIFORM: processors, softmax, multinomial."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(UNIFORM["repetition_penalty"]),
            TemperatureLogitsWarper(UNIFORM["temperature"]),
            TopKLogitsWarper(UNIFORM["top_k"]),
            TopPLogitsWarper(UNIFORM["top_p"]),
        ]
    )
    input_ids = torch.tensor(
        [list(s.prompt_token_ids) + list(s.output_token_ids) for s in states], device=device
    )

    def sample(logits: torch.Tensor) -> torch.Tensor:
        scores = processors(input_ids, logits.clone())
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)

    return sample


def build_states(make_params, device: str) -> list[SamplingState]:
    rng = random.Random(0)
    states = []
    for i in range(BATCH):
        prompt = [rng.randrange(VOCAB) for _ in range(PROMPT_LEN)]
        params = make_params(i)
        stops = params.resolve_stop_token_ids([2])
        state = SamplingState.create(params, prompt, stops, device=device)
        state.output_token_ids.extend(rng.randrange(VOCAB) for _ in range(OUTPUT_LEN))
        states.append(state)
    return states


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--number", type=int, default=20)
    args = parser.parse_args()
    logits = torch.randn(BATCH, VOCAB, device=args.device) * 3
    sampler = Sampler()
    cases = {
        "greedy": build_states(lambda i: SamplingParams(temperature=0.0), args.device),
        "mixed": build_states(mixed_params, args.device),
        "uniform": build_states(lambda i: SamplingParams(**UNIFORM), args.device),
    }
    print(f"device={args.device} threads={torch.get_num_threads()} B={BATCH} V={VOCAB}")

    def per_call(fn) -> float:
        fn()  # warm-up
        return min(timeit.repeat(fn, number=args.number, repeat=3)) / args.number

    timings = {}
    for name, states in cases.items():
        # NOTE: to_host included: it is the step's one device->host copy (and its sync on CUDA).
        timings[name] = per_call(lambda s=states: sampler(logits, s).to_host())
        print(f"{name:>7}: {timings[name] * 1e3:.2f} ms/call")
    peer = transformers_sampler(cases["uniform"], args.device)
    theirs = per_call(lambda: peer(logits))
    print(
        f"uniform, transformers' processors + multinomial: {theirs * 1e3:.2f} ms/call; "
        f"ours {timings['uniform'] * 1e3:.2f} ms/call: {theirs / timings['uniform']:.2f}x"
    )


if __name__ == "__main__":
    main()
