"""What grammar-constrained decoding costs a decode step, and how long a grammar compiles.

On the `mini` checkpoint at batch 64, the same engine times steady decode steps with no
request constrained, half of them constrained by a JSON schema, and all of them, in one run
(the configurations interleave so machine noise hits each alike); it prints each median step
time and its ratio to the unconstrained step. Then it times compiling a typical strict tool
schema (the model card's get_weather) into a tool-call grammar: cold (a fresh compiler) and
cached (the same spec again).

Run: `.venv/bin/python benchmarks/bench_structured_outputs.py [--threads 1]`. Not collected by
pytest; it backs the figures in RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import add_threads_arg, checkpoint, code_version, machine_summary, set_threads

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.engine.llm_engine import LLMEngine
from ernie_cluster.sampling_params import SamplingParams, StructuredOutputsParams
from ernie_cluster.structured_output.compiler import CompileLimits, GrammarCompiler
from ernie_cluster.structured_output.formats import forced_tool_calls, tool_call_tag
from ernie_cluster.structured_output.params import GrammarSpec

BATCH = 64
PROMPT = "List every item in the warehouse inventory as JSON records, one per product."
# NOTE: at least 40 records, so no constrained request can finish inside the timed window.
LONG_SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "count": {"type": "integer", "minimum": 0},
                    "tags": {"type": "array", "items": {"enum": ["new", "used", "sale"]}},
                },
                "required": ["name", "count"],
            },
        }
    },
    "required": ["items"],
}
WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location"],
}


def step_times(engine: LLMEngine, num_constrained: int, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` decode steps at batch BATCH after `warmup` steps."""
    ids = []
    for i in range(BATCH):
        constraint = StructuredOutputsParams(json=LONG_SCHEMA) if i < num_constrained else None
        params = SamplingParams(
            temperature=1.0,
            seed=i,
            max_tokens=warmup + steps + 8,
            ignore_eos=True,
            structured_outputs=constraint,
        )
        request_id = f"c{num_constrained}-{i}-{time.monotonic_ns()}"
        engine.add_request(request_id, PROMPT, params)
        ids.append(request_id)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        engine.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return times


def compile_times(engine: LLMEngine, repeats: int) -> tuple[list[float], list[float]]:
    """(cold, cached) seconds to compile the get_weather tool-call grammar."""
    tag = tool_call_tag("get_weather", WEATHER, "tools[0].function.parameters")
    spec = GrammarSpec.from_format(forced_tool_calls([tag], after_reasoning=True, parallel=True))
    cold, cached = [], []
    for _ in range(repeats):
        compiler = GrammarCompiler(
            engine.tokenizer,
            engine.model_config.vocab_size,
            engine.eos_token_ids,
            CompileLimits.from_config(engine.config),
        )
        start = time.perf_counter()
        compiler.submit(spec).future.result()
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        compiler.submit(spec).future.result()
        cached.append(time.perf_counter() - start)
        compiler.shutdown()
    return cold, cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=8, help="decode steps before timing")
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setting")
    add_threads_arg(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine_summary(), "|", code_version())
    config = EngineConfig(
        model=str(checkpoint("mini")),
        dtype="float32",
        show_progress=False,
        max_num_seqs=BATCH,
        max_num_batched_tokens=4096,
    )
    engine = LLMEngine(config)
    settings = {"none": 0, "half": BATCH // 2, "all": BATCH}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, constrained in settings.items():
            times[name] += step_times(engine, constrained, args.warmup, args.steps)
    base = statistics.median(times["none"])
    print(f"decode step at batch {BATCH}, mini, {args.rounds}x{args.steps} steps each:")
    for name, constrained in settings.items():
        median = statistics.median(times[name])
        print(
            f"  {constrained:2d}/{BATCH} constrained: {median * 1e3:7.2f} ms "
            f"({median / base:.3f}x the unconstrained step)"
        )
    cold, cached = compile_times(engine, repeats=5)
    print(
        f"get_weather tool-call grammar ({engine.tokenizer.vocab_size} tokens): compile cold "
        f"{statistics.median(cold) * 1e3:.1f} ms, cached {statistics.median(cached) * 1e6:.0f} us"
    )
    engine.shutdown()


if __name__ == "__main__":
    main()
