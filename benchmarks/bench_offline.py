"""Offline generation throughput on the `mini` preset (float32, CPU): our LLM vs transformers.

--num-requests random token-id prompts with lengths uniform in [--min-prompt, --max-prompt]
and output lengths uniform in [--min-output, --max-output] (fixed seed), greedy, ignore_eos.
Ours: one `LLM.generate` call over all requests, each with max_tokens = its output length.
Transformers: `generate` over batches of --hf-batch-size requests in request order, left
padded with an attention mask, min_new_tokens = max_new_tokens = the longest output of the
batch. Only each request's own output tokens count as useful output on both sides: the
tokens transformers generates past a request's length are padding waste, and its figure is
computed without them. Model loading and a short warm-up are not timed; the two sides
alternate in ABBA order over --repeats runs each and the medians are compared.

Run: `.venv/bin/python benchmarks/bench_offline.py [--quick] [--threads 1]`
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from common import (
    BackgroundLoad,
    add_threads_arg,
    checkpoint,
    code_version,
    interleave,
    load_hf_model,
    machine_summary,
    median,
    random_prompt,
    set_threads,
    spread,
)

from ernie_cluster import LLM, SamplingParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument(
        "--max-num-seqs", type=int, default=None, help="ours (default: the engine's default)"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="ours: step token budget (default: the engine's default)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side, in ABBA order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 16 requests, outputs of 4..16 tokens"
    )
    add_threads_arg(parser)
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.min_output, args.max_output = 16, 4, 16
    return args


def make_requests(args: argparse.Namespace, vocab: int) -> tuple[list[list[list[int]]], list[int]]:
    """Prompts for each timed run and the output lengths (the same lengths in every run).

    NOTE: each run gets fresh token ids, so our prefix cache cannot serve a repeated run's
    prompts from the previous one.
    """
    rng = random.Random(args.seed)
    prompt_lens = [rng.randint(args.min_prompt, args.max_prompt) for _ in range(args.num_requests)]
    output_lens = [rng.randint(args.min_output, args.max_output) for _ in range(args.num_requests)]
    runs = []
    for run in range(args.repeats):
        run_rng = random.Random(f"{args.seed}-run-{run}")
        runs.append([random_prompt(run_rng, n, vocab) for n in prompt_lens])
    return runs, output_lens


def run_ours(llm: LLM, prompts: list[list[int]], output_lens: list[int]) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in output_lens]
    outputs = llm.generate(prompts, params)
    return [out.outputs[0].token_ids for out in outputs]


@torch.inference_mode()
def run_theirs(
    model: torch.nn.Module, prompts: list[list[int]], output_lens: list[int], batch_size: int
) -> tuple[list[list[int]], int]:
    """Greedy outputs cut to each request's length, and the number of tokens generated."""
    outputs: list[list[int]] = []
    num_generated = 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        new_tokens = max(output_lens[start : start + batch_size])
        width = max(len(p) for p in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)  # pad id 0, left padding
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, prompt in enumerate(batch):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            eos_token_id=None,
            pad_token_id=0,
        )
        num_generated += out[:, width:].numel()
        for row, n in enumerate(output_lens[start : start + batch_size]):
            outputs.append(out[row, width : width + n].tolist())
    return outputs, num_generated


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    path = checkpoint(args.preset, args.seed)
    engine_options = {
        key: value
        for key, value in (
            ("max_num_seqs", args.max_num_seqs),
            ("max_num_batched_tokens", args.max_num_batched_tokens),
        )
        if value is not None
    }
    llm = LLM(model=str(path), dtype="float32", show_progress=False, **engine_options)
    hf_model = load_hf_model(path)
    vocab = llm.engine.model_config.vocab_size
    runs, output_lens = make_requests(args, vocab)
    num_useful = sum(output_lens)
    config = llm.engine.config

    print(f"machine: {machine_summary()}")
    print(f"code: {code_version()}")
    print(f"checkpoint: {path} (preset {args.preset}, float32)")
    print(
        f"requests: {len(output_lens)}, prompt tokens {sum(len(p) for p in runs[0])} "
        f"(lengths {args.min_prompt}..{args.max_prompt}), requested output tokens {num_useful} "
        f"(lengths {args.min_output}..{args.max_output}), seed {args.seed}"
    )
    print(
        f"ours: max_num_seqs={config.max_num_seqs} "
        f"max_num_batched_tokens={config.max_num_batched_tokens} "
        f"prefix_caching={config.enable_prefix_caching}; "
        f"theirs: batches of {args.hf_batch_size} in request order, left padded"
    )

    warm_rng = random.Random(f"{args.seed}-warm-up")
    warm_prompts, warm_lens = [random_prompt(warm_rng, 32, vocab) for _ in range(2)], [4, 4]
    run_ours(llm, warm_prompts, warm_lens)
    run_theirs(hf_model, warm_prompts, warm_lens, args.hf_batch_size)
    hits_before = llm.get_stats().prefix_cache_hits

    results: dict[str, list[list[int]]] = {}
    generated: list[int] = []
    num_ours_runs = 0

    def ours() -> float:
        nonlocal num_ours_runs
        prompts = runs[num_ours_runs]  # the k-th run of each side gets the same prompts
        num_ours_runs += 1
        start = time.perf_counter()
        results["ours"] = run_ours(llm, prompts, output_lens)
        return time.perf_counter() - start

    def theirs() -> float:
        prompts = runs[len(generated)]
        start = time.perf_counter()
        results["theirs"], num_generated = run_theirs(
            hf_model, prompts, output_lens, args.hf_batch_size
        )
        generated.append(num_generated)
        return time.perf_counter() - start

    with BackgroundLoad() as load:
        seconds = interleave({"ours": ours, "theirs": theirs}, args.repeats, warmup=0)

    for name, outs in results.items():
        lengths = [len(o) for o in outs]
        if lengths != output_lens:
            raise RuntimeError(f"{name} did not return the requested output lengths")
    rates = {name: [num_useful / s for s in values] for name, values in seconds.items()}
    print(f"\nuseful output tokens: {num_useful} (each request's own max_tokens, both sides)")
    print(
        f"theirs generated {generated[-1]} tokens in all; "
        f"{generated[-1] - num_useful} were padding waste, not counted"
    )
    for name, values in rates.items():
        print(
            f"  {name:<7} {median(values):8.1f} output tokens/s   "
            f"{median(seconds[name]):7.1f} s   (spread {spread(values)} tokens/s)"
        )
    print(f"  ratio ours/theirs: {median(rates['ours']) / median(rates['theirs']):.2f}x")
    pairs = [o / t for o, t in zip(rates["ours"], rates["theirs"], strict=True)]
    print(f"  per-run ratios: {' '.join(f'{p:.2f}' for p in pairs)}")
    raw = generated[-1] / median(seconds["theirs"])
    print(f"  (theirs counting its padding waste as output too: {raw:.1f} tokens/s)")
    same = sum(o == t for o, t in zip(results["ours"], results["theirs"], strict=True))
    first = sum(o[0] == t[0] for o, t in zip(results["ours"], results["theirs"], strict=True))
    print(
        f"  greedy outputs equal: {same}/{len(output_lens)} requests "
        f"(first token equal: {first}/{len(output_lens)})"
    )
    hits = llm.get_stats().prefix_cache_hits - hits_before
    print(f"  ours: prefix-cache hits during the timed runs: {hits} tokens")
    print(f"\n{load.describe()}")
    llm.shutdown()


if __name__ == "__main__":
    main()
