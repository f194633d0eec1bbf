"""`ernie-cluster generate`: offline generation for one prompt, printed as a JSON line per
sample (with `--chat`: the reasoning and the answer apart, as the server's `ernie_x1` parser
splits them). The engine flags are the shared ones (cli/model_args over `EngineSettings`)."""

from __future__ import annotations

import argparse
import json

from ernie_cluster.cli.model_args import add_model_args, model_values
from ernie_cluster.config.engine_config import EngineSettings
from ernie_cluster.serving.parsers import make_parser

PLAIN_MAX_TOKENS = 32
CHAT_MAX_TOKENS = 1024


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="offline generation for one prompt")
    add_model_args(gen, EngineSettings, "model and engine")
    gen.add_argument("--prompt", default="Hello, ERNIE!", help="prompt text")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the chat template and print reasoning and answer apart",
    )
    gen.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help=f"most tokens to generate (default {PLAIN_MAX_TOKENS}; with --chat "
        f"{CHAT_MAX_TOKENS}: a thinking model reasons before it answers)",
    )
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from ernie_cluster import LLM, SamplingParams

    llm = LLM(**model_values(args, EngineSettings))
    default_max_tokens = CHAT_MAX_TOKENS if args.chat else PLAIN_MAX_TOKENS
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens or default_max_tokens,
        seed=args.seed,
    )
    try:
        if args.chat:
            outputs = llm.chat([{"role": "user", "content": args.prompt}], params)
        else:
            outputs = llm.generate([args.prompt], params)
        for out in outputs:
            for sample in out.outputs:
                line = {"prompt": out.prompt if not args.chat else args.prompt}
                if args.chat:
                    message = make_parser("ernie_x1", None, tools_enabled=False).parse(sample.text)
                    line["reasoning_content"] = message.reasoning_content
                    line["content"] = message.content
                else:
                    line["text"] = sample.text
                line["token_ids"] = sample.token_ids
                line["finish_reason"] = sample.finish_reason
                print(json.dumps(line, ensure_ascii=False))
    finally:
        llm.shutdown()
    return 0
