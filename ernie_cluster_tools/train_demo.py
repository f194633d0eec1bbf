"""`ernie-cluster train-demo`: train the built-in demo model on CPU and write its checkpoint.

Owns the subcommand's flags, its progress bar and its summary; the work is
`ernie_cluster_tools.demo_model.pipeline.build_demo_model`.
"""

from __future__ import annotations

import argparse
import json
import sys

from ernie_cluster_tools.demo_model.settings import TrainSettings

DESCRIPTION = """\
Train the demo model: a small ernie4_5_moe checkpoint (4 layers, 3 of them MoE with 8 experts,
top-2, plus a shared expert; 4 KV heads) on synthetic conversations in the ERNIE Thinking
format: greetings, weather questions answered with a get_weather tool call, answers after a
tool result, questions it cannot look up without tools, multi-turn follow-ups. Training runs
transformers' Ernie4_5_MoeForCausalLM on the CPU and is deterministic for a given seed and
thread count. The result (bfloat16 safetensors, tokenizer, chat template, and train_log.json
with the settings and every step's loss) is what
`ernie-cluster serve --model DIR` and scripts/demo.sh serve; the package ships one built with
the defaults.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `train-demo` on the `ernie-cluster` subcommand parsers (loads no torch)."""
    defaults = TrainSettings()
    parser = subparsers.add_parser(
        "train-demo",
        help="train the small demo model on CPU (about 21 minutes on 2 cores)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", help="where to write the checkpoint (created)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="data and init seed")
    parser.add_argument(
        "--steps",
        type=int,
        default=defaults.num_steps,
        help=f"optimizer steps of {defaults.batch_size} conversations (default {defaults.num_steps})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads; the loss curve is reproducible for a fixed count (default 2)",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="weights dtype of the checkpoint (router weights stay float32)",
    )
    parser.add_argument(
        "--force", action="store_true", help="write into a directory that is not empty"
    )
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="afterwards, score the checkpoint on held-out conversations (greedy)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from ernie_cluster_tools.demo_model.pipeline import build_demo_model

    target = Path(args.directory)
    if target.exists() and not target.is_dir():
        print(f"error: {target} exists and is not a directory", file=sys.stderr)
        return 2
    if target.is_dir() and any(target.iterdir()) and not args.force:
        print(
            f"error: {target} is not empty; pass --force to write the checkpoint there anyway",
            file=sys.stderr,
        )
        return 2
    settings = TrainSettings(seed=args.seed, num_steps=args.steps, num_threads=args.threads)
    with tqdm(total=settings.num_steps, desc="train-demo", unit="step") as bar:

        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        report, _ = build_demo_model(args.directory, settings, dtype=args.dtype, on_step=on_step)
    summary = {
        "directory": str(report.directory),
        "steps": len(report.losses),
        "train_seconds": round(report.train_seconds, 1),
        "total_seconds": round(report.total_seconds, 1),
        "final_loss": round(report.final_loss, 4),
        "parameters": report.num_parameters,
        "vocab_size": report.vocab_size,
        "tokens": report.num_tokens,
    }
    if args.evaluate:
        from ernie_cluster_tools.demo_model.evaluate import evaluate_checkpoint

        scores = evaluate_checkpoint(str(report.directory), dtype="float32")
        summary.update(
            tool_call_accuracy=scores.tool_call_accuracy,
            arguments_json_rate=scores.arguments_json_rate,
            answer_temperature_rate=scores.answer_temperature_rate,
            clean_greeting_rate=scores.clean_greeting_rate,
        )
    print(json.dumps(summary, indent=2))
    return 0
