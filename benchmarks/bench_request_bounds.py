"""Stop strings and grammar compiles under hostile sizes (issue 20), each against a baseline
measured in the same run.

1. Stop strings: building the per-request index of 100,000 strings of ~20 characters, and the
   per-token matching cost of n=16 sequences, the shared one-dict matcher vs the per-string
   `str.find` loop it replaced, for 4 to 100,000 stop strings.
2. Grammar compiles: how long a small regex waits for its grammar while a 10,000-choice
   grammar compiles, with one compile thread (the old pool) and with two (the default).

    .venv/bin/python benchmarks/bench_request_bounds.py
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from common import BackgroundLoad, checkpoint, code_version, machine_summary

from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.engine.stop_strings import StopStrings, cut_per_string
from ernie_cluster.structured_output.compiler import CompileLimits, GrammarCompiler
from ernie_cluster.structured_output.params import GrammarSpec
from ernie_cluster.tokenizer import load_tokenizer

SEQUENCES = 16
TOKENS = 64
CHARS_PER_TOKEN = 4


def stop_strings(count: int, rng: random.Random) -> list[str]:
    # Never found in the generated text (lowercase letters): every token checks them all.
    return ["".join(rng.choices("QWXZ", k=18)) + f"{i:x}" for i in range(count)]


def matching_seconds(cut, rng: random.Random) -> float:
    """Seconds to check TOKENS tokens of SEQUENCES sequences, one call per token."""
    texts = ["".join(rng.choices("abcdefgh ", k=200)) for _ in range(SEQUENCES)]
    deltas = ["".join(rng.choices("abcdefgh ", k=CHARS_PER_TOKEN)) for _ in range(TOKENS)]
    start = time.perf_counter()
    for delta in deltas:
        for i in range(SEQUENCES):
            if cut(texts[i], delta) is None:
                texts[i] += delta
    return time.perf_counter() - start


def bench_stop_strings(rng: random.Random) -> None:
    stops = stop_strings(100_000, rng)
    builds = []
    for _ in range(3):
        start = time.perf_counter()
        StopStrings(stops)._build()
        builds.append(time.perf_counter() - start)
    mean_len = statistics.mean(map(len, stops))
    print(
        f"index of 100,000 stop strings (mean {mean_len:.1f} chars): "
        f"median {statistics.median(builds) * 1e3:.0f} ms to build (3 runs)"
    )
    print(f"\nper token, {SEQUENCES} sequences ({CHARS_PER_TOKEN} new chars each):")
    print("| stop strings | per-string find | shared matcher | find / matcher |")
    print("|---|---|---|---|")
    for count in (4, 64, 1_000, 100_000):
        subset = stops[:count]
        matcher = StopStrings(subset)
        matcher._build()
        new = matching_seconds(lambda text, delta, m=matcher: m.cut(text, delta, False), rng)
        old = matching_seconds(
            lambda text, delta, s=subset: cut_per_string(text, delta, s, False), rng
        )
        print(
            f"| {count:,} | {old / TOKENS * 1e3:.3f} ms | {new / TOKENS * 1e3:.3f} ms "
            f"| {old / new:.1f}x |"
        )


def choice_spec(count: int, tag: str) -> GrammarSpec:
    values = [{"type": "const_string", "value": f"{tag}-{i:06d}"} for i in range(count)]
    return GrammarSpec.from_format({"type": "or", "elements": values})


def small_wait_seconds(threads: int, big_choices: int, round_id: int) -> tuple[float, float]:
    """(seconds a small regex waited for its grammar behind a big compile, the big compile's
    own seconds) with `threads` compile threads."""
    path = checkpoint("tiny")
    tokenizer = load_tokenizer(path)
    vocab_size = ErnieMoeConfig.from_pretrained(path).vocab_size
    limits = CompileLimits(threads=threads, timeout_s=600.0, max_pending=8, cache_bytes=2**31)
    compiler = GrammarCompiler(tokenizer, vocab_size, [2], limits)
    start = time.perf_counter()
    big = compiler.submit(choice_spec(big_choices, f"r{round_id}t{threads}"))
    small = compiler.submit(
        GrammarSpec.from_format({"type": "regex", "pattern": f"[a-z]{{{round_id + 1}}}"})
    )
    small.future.result()
    waited = time.perf_counter() - start
    big.future.result()
    big_s = time.perf_counter() - start
    compiler.shutdown()
    return waited, big_s


def bench_grammar_pool(big_choices: int, rounds: int) -> None:
    print(f"\na small regex submitted right after a {big_choices:,}-choice grammar:")
    print("| compile threads | small regex waits (median) | big grammar compiles (median) |")
    print("|---|---|---|")
    waits: dict[int, list[float]] = {1: [], 2: []}
    bigs: dict[int, list[float]] = {1: [], 2: []}
    for round_id in range(rounds):
        for threads in (1, 2) if round_id % 2 == 0 else (2, 1):  # ABBA
            waited, big_s = small_wait_seconds(threads, big_choices, round_id)
            waits[threads].append(waited)
            bigs[threads].append(big_s)
    for threads in (1, 2):
        print(
            f"| {threads} | {statistics.median(waits[threads]) * 1e3:.1f} ms "
            f"| {statistics.median(bigs[threads]) * 1e3:.0f} ms |"
        )
    ratio = statistics.median(waits[1]) / statistics.median(waits[2])
    print(f"one thread / two threads, small regex wait: {ratio:.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-choices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=4, help="ABBA rounds of the pool bench")
    args = parser.parse_args()
    print(machine_summary(), "|", code_version())
    with BackgroundLoad() as load:
        bench_stop_strings(random.Random(0))
        bench_grammar_pool(args.big_choices, args.rounds)
    print("\n" + load.describe())


if __name__ == "__main__":
    main()
