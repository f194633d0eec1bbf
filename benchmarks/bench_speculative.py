"""Speculative decoding on and off, in the same run, per method (`ngram`, `suffix`, and
`draft_model` when asked).

Three offline workloads, greedy (float32 by default, so outputs must be identical), at
most --max-num-seqs sequences decoding at once, one `LLM.generate` call per timed run, engines
built once and alternated in ABBA order (`common.interleave`: one untimed warm-up run, then
--repeats), the k-th run of both sides on the same prompts:

* demo: the trained demo model's held-out conversations, tool calls (`weather_call`) and
  answers from a tool result (`weather_answer`), as the chat template renders them; a
  different set of conversations in every run (the suffix method sees earlier runs'
  outputs, as a server sees other requests'). The reply restates the question's city and
  the tool result's numbers.
* copy: the random `mini` checkpoint, the same requests in every run: an agent loop that
  repeats itself, its outputs copying earlier outputs (the upper bound for `suffix`; a
  random-weight model never copies its prompt, so `ngram` gets only what its own output
  loops give it).
* wrong: `mini` on random prompts, every step proposing k tokens the requests forbid
  (`logit_bias` -100, the same on both sides), so every proposal is rejected: what a step
  pays to verify k tokens that never help (the overhead bound).

Printed per workload and method: output tokens/s off and on (median of --repeats), on/off,
the acceptance rate, the mean accepted length, and how many outputs were identical (greedy:
all must be).

`draft_model` (not in the default --methods) needs a draft with the target's vocabulary, and
these checkpoints have no trained small sibling: --draft random (default) is a 2-layer random
checkpoint (it proposes garbage: the cost of running a draft that never helps), --draft self
the target as its own draft (proposals always right, but the draft costs a target: an
acceptance ceiling, not a speed figure), or a checkpoint directory.

    .venv/bin/python benchmarks/bench_speculative.py
    .venv/bin/python benchmarks/bench_speculative.py --workloads copy --methods suffix -k 6
    .venv/bin/python benchmarks/bench_speculative.py --methods draft_model --draft self
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from common import (
    OUT_DIR,
    BackgroundLoad,
    add_threads_arg,
    checkpoint,
    interleave,
    machine_summary,
    random_prompt,
    set_threads,
)

WORKLOADS = ("demo", "copy", "wrong")
METHODS = ("ngram", "suffix")
"""The default --methods; draft_model runs when named."""
FORBIDDEN_TOKEN = 3
"""The token every `wrong` proposal is made of; each request bans it with logit_bias."""


def demo_workload(args: argparse.Namespace):
    from ernie_cluster import SamplingParams
    from ernie_cluster.checkpoints.demo import demo_checkpoint
    from ernie_cluster_tools.demo_model.evaluate import heldout_examples

    runs = 1 + args.repeats
    calls = heldout_examples("weather_call", args.demo_calls * runs)
    answers = heldout_examples("weather_answer", args.demo_answers * runs)
    per_run = [
        calls[i * args.demo_calls : (i + 1) * args.demo_calls]
        + answers[i * args.demo_answers : (i + 1) * args.demo_answers]
        for i in range(runs)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=160, skip_special_tokens=False)
    return str(demo_checkpoint()), args.dtype, per_run, params


def copy_workload(args: argparse.Namespace):
    from ernie_cluster import SamplingParams

    rng = random.Random(2)
    prompts = [random_prompt(rng, rng.randint(32, 128), 32000) for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    return str(checkpoint("mini")), args.dtype, [prompts] * (1 + args.repeats), params


def wrong_workload(args: argparse.Namespace):
    from ernie_cluster import SamplingParams

    rng = random.Random(3)
    prompts = [random_prompt(rng, rng.randint(32, 128), 32000) for _ in range(args.num_prompts)]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=args.output_len,
        ignore_eos=True,
        logit_bias={FORBIDDEN_TOKEN: -100.0},
    )
    return str(checkpoint("mini")), args.dtype, [prompts] * (1 + args.repeats), params


def draft_checkpoint(args: argparse.Namespace, model: str) -> str:
    """The draft model for `model` that --draft names (see the module docstring)."""
    if args.draft == "self":
        return model
    if args.draft != "random":
        return args.draft
    from ernie_cluster.config.model_config import ErnieMoeConfig
    from ernie_cluster_tools.fixtures.make_tiny import make_tiny_checkpoint

    target = ErnieMoeConfig.from_pretrained(model)
    path = OUT_DIR / f"draft-random-vocab{target.vocab_size}"
    if not (path / "config.json").is_file():
        overrides = {
            "vocab_size": target.vocab_size,
            "num_hidden_layers": 2,
            "max_position_embeddings": target.max_position_embeddings,
        }
        make_tiny_checkpoint(path, preset="tiny", seed=1, overrides=overrides, force=True)
    return str(path)


def always_wrong(llm) -> None:
    """Make the engine's proposer offer k forbidden tokens whenever it may propose."""
    proposer = llm.engine.proposer
    proposer._method.propose = lambda req_id, num_tokens: [FORBIDDEN_TOKEN] * num_tokens


def run_workload(args: argparse.Namespace, workload: str, method: str) -> dict:
    from ernie_cluster import LLM

    model, dtype, per_run, params = {
        "demo": demo_workload,
        "copy": copy_workload,
        "wrong": wrong_workload,
    }[workload](args)
    spec = {"method": method, "num_speculative_tokens": args.k}
    if method == "draft_model":
        spec["model"] = draft_checkpoint(args, model)
    common = dict(
        model=model,
        dtype=dtype,
        show_progress=False,
        enable_prefix_caching=False,
        max_num_seqs=args.max_num_seqs,
    )
    engines = {"off": LLM(**common), "on": LLM(**common, speculative_config=spec)}
    if workload == "wrong":
        always_wrong(engines["on"])
    if workload == "demo":
        render = engines["off"].render_chat
        per_run = [[render(e.messages, e.tools) for e in run] for run in per_run]
    outputs: dict[str, list] = {name: [] for name in engines}

    def runner(name: str):
        def run() -> float:
            prompts = per_run[len(outputs[name])]  # the k-th run of each side: the same set
            start = time.perf_counter()
            result = engines[name].generate(prompts, params)
            seconds = time.perf_counter() - start
            outputs[name].append([o.outputs[0].token_ids for o in result])
            return seconds

        return run

    with BackgroundLoad() as load:
        seconds = interleave({name: runner(name) for name in engines}, args.repeats)
    stats = engines["on"].get_stats().spec_decode
    for llm in engines.values():
        llm.shutdown()
    timed = {name: runs[1:] for name, runs in outputs.items()}  # the warm-up run is untimed
    tokens = statistics.mean(sum(len(t) for t in run) for run in timed["off"])
    rates = {name: tokens / statistics.median(times) for name, times in seconds.items()}
    pairs = [
        (a, b)
        for run_off, run_on in zip(timed["off"], timed["on"], strict=True)
        for a, b in zip(run_off, run_on, strict=True)
    ]
    same = sum(a == b for a, b in pairs)
    prompts = per_run[1]
    result = {
        "workload": workload,
        "method": method,
        "draft": spec.get("model"),
        "k": args.k,
        "prompts": len(prompts),
        "output_tokens": tokens,
        "off_tok_per_s": rates["off"],
        "on_tok_per_s": rates["on"],
        "speedup": rates["on"] / rates["off"],
        "acceptance_rate": stats.acceptance_rate,
        "mean_accepted_length": stats.mean_accepted_length,
        "identical_outputs": f"{same}/{len(pairs)}",
        "runs_s": seconds,
        "background_cores": load.cores,
    }
    print(
        f"  {workload:5} {method:11} off {rates['off']:7.1f} tok/s  on {rates['on']:7.1f} tok/s"
        f"  {result['speedup']:.2f}x  acceptance {stats.acceptance_rate:.2f}  mean accepted "
        f"length {stats.mean_accepted_length:.2f}  identical {same}/{len(pairs)}  "
        f"({load.describe()})",
        flush=True,
    )
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("-k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument(
        "--draft",
        default="random",
        help="draft_model's draft: random (a 2-layer random checkpoint), self, or a path",
    )
    parser.add_argument(
        "--dtype", default="float32", help="model dtype (float32: greedy outputs must be equal)"
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=4,
        help="sequences decoding at once (speculation pays at low concurrency, as a lightly "
        "loaded server or an interactive session)",
    )
    parser.add_argument("--num-prompts", type=int, default=8, help="copy/wrong prompts per run")
    parser.add_argument("--output-len", type=int, default=128, help="copy/wrong output tokens")
    parser.add_argument("--demo-calls", type=int, default=16, help="held-out tool calls")
    parser.add_argument("--demo-answers", type=int, default=16, help="held-out tool answers")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side")
    add_threads_arg(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    print(machine_summary())
    print(
        f"speculative decoding, k={args.k}, greedy, {args.dtype}, {args.max_num_seqs} sequences "
        f"at once, {args.threads} thread(s):",
        flush=True,
    )
    results = [
        run_workload(args, workload, method)
        for workload in args.workloads.split(",")
        for method in args.methods.split(",")
    ]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / "bench_speculative.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
