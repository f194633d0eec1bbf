"""The `ernie-cluster` command line: make-tiny, generate (offline) and the subcommands of the
later layers. Each subcommand parses its flags here and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ernie_cluster.checkpoints.presets import PRESETS


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or Hugging Face repo id "
        "(default: the built-in demo checkpoint, made on first use)",
    )
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and activation dtype (default: the checkpoint's)",
    )
    g.add_argument("--device", default="cpu", help="torch device of the workers (cpu, cuda)")
    g.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="shards of attention heads (must divide the kv heads)",
    )
    g.add_argument(
        "--expert-parallel-size",
        type=int,
        default=None,
        help="shards of the experts (default: the tensor-parallel size)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output (default: from config.json)",
    )
    g.add_argument("--max-num-seqs", type=int, default=32, help="most sequences per step")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget of one step (prefill chunks and decodes)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="KV cache size in blocks (default: from the memory budget)",
    )
    g.add_argument(
        "--no-prefix-caching", action="store_true", help="disable automatic prefix caching"
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {
        "dtype": args.dtype,
        "revision": args.revision,
        "device": args.device,
        "tensor_parallel_size": args.tensor_parallel_size,
        "expert_parallel_size": args.expert_parallel_size or args.tensor_parallel_size,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "block_size": args.block_size,
        "num_kv_blocks": args.num_kv_blocks,
        "enable_prefix_caching": not args.no_prefix_caching,
    }


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from ernie_cluster.checkpoints.make_tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(args.directory, args.preset, args.seed, args.dtype)
    print(f"wrote the {args.preset!r} checkpoint (seed {args.seed}) to {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ernie_cluster import LLM, SamplingParams

    llm = LLM(model=args.model, **engine_kwargs(args))
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    try:
        if args.chat:
            outputs = llm.chat([{"role": "user", "content": args.prompt}], params)
        else:
            outputs = llm.generate([args.prompt], params)
        for out in outputs:
            for sample in out.outputs:
                print(
                    json.dumps(
                        {
                            "prompt": out.prompt if not args.chat else args.prompt,
                            "text": sample.text,
                            "token_ids": sample.token_ids,
                            "finish_reason": sample.finish_reason,
                        },
                        ensure_ascii=False,
                    )
                )
    finally:
        llm.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ernie-cluster",
        description="Serve ERNIE-4.5 mixture-of-experts models (OpenAI-compatible, on Ray).",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny", help="write a random checkpoint for tests and demos")
    tiny.add_argument("directory", help="output directory (created)")
    tiny.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    tiny.set_defaults(func=cmd_make_tiny)

    gen = sub.add_parser("generate", help="offline generation for one prompt")
    add_engine_args(gen)
    gen.add_argument("--prompt", default="Hello, ERNIE!", help="prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
