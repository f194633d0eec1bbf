"""Forward throughput on the `mini` preset (float32, CPU, one process): ours vs transformers.

(a) Prefill: one prompt of --prompt-len tokens, logits of its last token. Ours runs the flat
    batch through the model with AttentionMetadata over a paged KV cache; transformers runs
    `model(input_ids, use_cache=True, logits_to_keep=1)`, as `generate` does for its prefill.
(b) Decode: --batch sequences that already hold --context tokens of KV each take
    --decode-steps greedy steps. Ours: one flat batch of --batch decode tokens per step, both
    straight through the model (metadata + forward + logits + argmax) and through ModelRunner
    (the engine's worker path: per-request state, metadata, forward, Sampler). Transformers:
    a batch forward of one token per sequence with its DynamicCache, then argmax: the core of
    one `generate` step without its logits processors and stopping checks.
Contenders alternate in ABBA order after a warm-up; the medians and the ratio ours/theirs are
printed, with the greedy tokens of all contenders checked equal.

Run: `.venv/bin/python benchmarks/bench_forward.py [--threads 2] [--repeats 5]`
"""

from __future__ import annotations

import argparse
import inspect
import random
import time

import torch
from common import (
    BackgroundLoad,
    add_threads_arg,
    checkpoint,
    code_version,
    greedy_step,
    interleave,
    load_hf_model,
    machine_summary,
    median,
    random_prompt,
    set_threads,
    spread,
)

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.loader.model_loader import load_model
from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.step_io import (
    CachedRequestData,
    NewRequestData,
    SchedulerOutput,
)
from ernie_cluster.worker.model_runner import ModelRunner, allocate_kv_caches

BLOCK_SIZE = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--prompt-len", type=int, default=512, help="prefill prompt length")
    parser.add_argument("--batch", type=int, default=16, help="decode batch size")
    parser.add_argument("--context", type=int, default=128, help="decode: tokens already cached")
    parser.add_argument("--decode-steps", type=int, default=32, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per contender")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per contender")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_arg(parser)
    return parser.parse_args()


def num_blocks(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_SIZE)


def hf_cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.x names the cache argument `cache`; earlier releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class OursModel:
    """Our model called directly on flat batches over its own paged KV cache."""

    def __init__(self, model: Ernie4_5_MoeForCausalLM, num_slots: int) -> None:
        self.model = model
        self.kv_caches = allocate_kv_caches(model, num_blocks(num_slots), BLOCK_SIZE, "cpu")
        self.metadata_seconds: list[float] = []

    def step(
        self,
        token_ids: list[int],
        query_lens: list[int],
        context_lens: list[int],
        tables: list[list[int]],
    ) -> list[int]:
        next_ids, seconds = greedy_step(
            self.model, token_ids, query_lens, context_lens, tables, BLOCK_SIZE
        )
        self.metadata_seconds.append(seconds)
        return next_ids

    def prefill(self, prompt: list[int]) -> tuple[float, int]:
        self.model.bind_kv_caches(self.kv_caches)
        start = time.perf_counter()
        table = list(range(num_blocks(len(prompt))))
        token = self.step(prompt, [len(prompt)], [len(prompt)], [table])[0]
        return time.perf_counter() - start, token

    def decode(self, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
        """Prefill every prompt (untimed), then time `steps` batched greedy decode steps."""
        self.model.bind_kv_caches(self.kv_caches)
        context = len(prompts[0])
        per_seq = num_blocks(context + steps)
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
        batch = len(prompts)
        flat = [t for p in prompts for t in p]
        tokens = self.step(flat, [context] * batch, [context] * batch, tables)
        generated = [[t] for t in tokens]
        self.metadata_seconds.clear()
        start = time.perf_counter()
        for pos in range(context, context + steps):
            tokens = self.step(tokens, [1] * batch, [pos + 1] * batch, tables)
            for seq, token in zip(generated, tokens, strict=True):
                seq.append(token)
        return time.perf_counter() - start, generated


class OursRunner:
    """The engine's worker path: ModelRunner fed hand-made SchedulerOutputs."""

    def __init__(self, model: Ernie4_5_MoeForCausalLM, num_slots: int) -> None:
        self.model = model
        self.num_blocks = num_blocks(num_slots)
        self.runner: ModelRunner | None = None
        self._round = 0

    def decode(self, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
        context = len(prompts[0])
        config = EngineConfig(
            model="unused",
            max_model_len=context + steps + BLOCK_SIZE,
            max_num_seqs=len(prompts),
            block_size=BLOCK_SIZE,
        )
        self.runner = ModelRunner(self.model, self.num_blocks, config)  # binds its caches
        self._round += 1
        params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
        per_seq = num_blocks(context + steps)
        ids = [f"r{self._round}-{i}" for i in range(len(prompts))]
        prefill = SchedulerOutput(
            new_requests=[
                NewRequestData(
                    req_id=req_id,
                    prompt_token_ids=prompt,
                    params=params,
                    stop_token_ids=[],
                    sample_index=0,
                    block_ids=list(range(i * per_seq, (i + 1) * per_seq)),
                    num_computed_tokens=0,
                )
                for i, (req_id, prompt) in enumerate(zip(ids, prompts, strict=True))
            ],
            num_scheduled_tokens=dict.fromkeys(ids, context),
        )
        self.runner.execute_model(prefill)
        start = time.perf_counter()
        for pos in range(context, context + steps):
            step = SchedulerOutput(
                cached_requests=[CachedRequestData(req_id, [], pos) for req_id in ids],
                num_scheduled_tokens=dict.fromkeys(ids, 1),
            )
            self.runner.execute_model(step)
        seconds = time.perf_counter() - start
        return seconds, [self.runner.requests[r].token_ids[context:] for r in ids]


class Theirs:
    """transformers' Ernie4_5_MoeForCausalLM with a DynamicCache."""

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache_kwarg = hf_cache_kwarg(model)
        self.new_cache = lambda: DynamicCache(config=model.config)

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> tuple[float, int]:
        start = time.perf_counter()
        cache = {self.cache_kwarg: self.new_cache()}
        out = self.model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1, **cache)
        token = int(out.logits[0, -1].argmax())
        return time.perf_counter() - start, token

    @torch.inference_mode()
    def decode(self, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
        cache = {self.cache_kwarg: self.new_cache()}
        out = self.model(torch.tensor(prompts), use_cache=True, logits_to_keep=1, **cache)
        tokens = out.logits[:, -1].argmax(-1)  # [B]
        generated = [tokens]
        start = time.perf_counter()
        for _ in range(steps):
            out = self.model(tokens[:, None], use_cache=True, **cache)
            tokens = out.logits[:, -1].argmax(-1)
            generated.append(tokens)
        seconds = time.perf_counter() - start
        return seconds, torch.stack(generated, dim=1).tolist()


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    path = checkpoint(args.preset, args.seed)
    ours_model = load_model(path, dtype="float32", show_progress=False)
    theirs = Theirs(load_hf_model(path))
    vocab = ours_model.config.vocab_size
    rng = random.Random(args.seed)
    prompt = random_prompt(rng, args.prompt_len, vocab)
    decode_prompts = [random_prompt(rng, args.context, vocab) for _ in range(args.batch)]
    decode_slots = args.batch * num_blocks(args.context + args.decode_steps) * BLOCK_SIZE
    ours = OursModel(ours_model, max(args.prompt_len, decode_slots))
    runner = OursRunner(ours_model, decode_slots)

    print(f"machine: {machine_summary()}")
    print(f"code: {code_version()}")
    print(f"checkpoint: {path} (preset {args.preset}, float32)")
    print(
        f"transformers experts={theirs.model.config._experts_implementation} "
        f"attention={theirs.model.config._attn_implementation}"
    )

    first_tokens: dict[str, int] = {}

    def prefill_contender(name: str, contender) -> float:
        seconds, first_tokens[name] = contender.prefill(prompt)
        return seconds

    decoded: dict[str, list[list[int]]] = {}

    def decode_contender(name: str, contender) -> float:
        seconds, decoded[name] = contender.decode(decode_prompts, args.decode_steps)
        return seconds

    with BackgroundLoad() as load:
        prefill = interleave(
            {
                "ours": lambda: prefill_contender("ours", ours),
                "theirs": lambda: prefill_contender("theirs", theirs),
            },
            args.repeats,
            args.warmup,
        )
        decode = interleave(
            {
                "ours": lambda: decode_contender("ours", ours),
                "ours-runner": lambda: decode_contender("ours-runner", runner),
                "theirs": lambda: decode_contender("theirs", theirs),
            },
            args.repeats,
            args.warmup,
        )

    print(f"\n(a) prefill: 1 prompt x {args.prompt_len} tokens, median of {args.repeats}")
    rates = {k: [args.prompt_len / s for s in v] for k, v in prefill.items()}
    for name, values in rates.items():
        print(f"  {name:<12} {median(values):9.1f} tokens/s   (spread {spread(values)})")
    pairs = [o / t for o, t in zip(rates["ours"], rates["theirs"], strict=True)]
    print(f"  ratio ours/theirs: {median(rates['ours']) / median(rates['theirs']):.2f}x")
    print(f"  per-repeat ratios: {' '.join(f'{p:.2f}' for p in pairs)}")
    agree = first_tokens["ours"] == first_tokens["theirs"]
    print(f"  greedy first token equal: {'yes' if agree else 'NO'}")

    num_tokens = args.batch * args.decode_steps
    print(
        f"\n(b) decode: batch {args.batch}, context {args.context}, "
        f"{args.decode_steps} steps, median of {args.repeats}"
    )
    rates = {k: [num_tokens / s for s in v] for k, v in decode.items()}
    for name, values in rates.items():
        print(f"  {name:<12} {median(values):9.1f} tokens/s   (spread {spread(values)})")
    for name in ("ours", "ours-runner"):
        pairs = [o / t for o, t in zip(rates[name], rates["theirs"], strict=True)]
        print(
            f"  ratio {name}/theirs: {median(rates[name]) / median(rates['theirs']):.2f}x"
            f"   per-repeat: {' '.join(f'{p:.2f}' for p in pairs)}"
        )
    meta_ms = 1e3 * median(ours.metadata_seconds)
    step_ms = 1e3 * median(decode["ours"]) / args.decode_steps
    print(f"  ours: AttentionMetadata.build {meta_ms:.2f} ms of a {step_ms:.1f} ms step")
    same = decoded["ours"] == decoded["ours-runner"] == decoded["theirs"]
    print(f"  greedy tokens equal across contenders: {'yes' if same else 'NO'}")
    print(f"\n{load.describe()}")


if __name__ == "__main__":
    main()
