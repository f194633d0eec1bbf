"""Decode and prefill of the real ERNIE-4.5-21B-A3B shape on one GPU, each against its roofline.

The model is the `full` preset (the real 21B-A3B architecture) with random bfloat16 weights
made on the device (normal(0, 0.02); RMSNorm weights 1; router weights normal(0, 0.02), which
gives router logits of std ~1, so tokens spread over the experts). No checkpoint, no network,
no Ray, no transformers: torch, triton and this package.

Every figure goes through the engine's per-rank step API: a `ModelRunner` (KV cache bound,
decode CUDA graphs captured unless the mode is eager) fed hand-built `SchedulerOutput`s, so
it includes input building, the forward, greedy sampling and the graphs. Each attention
backend (--backends) runs with CUDA graphs and with EngineConfig.enforce_eager (--modes).

Decode: each case is a batch of requests with given contexts (e.g. 64 x 16K, or the mixed
63 x 4K + 1 x 128K). A request arrives with a `ctx`-token prompt, `num_computed_tokens =
ctx - 1` and the blocks of `ctx` tokens, so its first step decodes one token over `ctx` keys
without prefilling them (the KV cache holds zeros: timing only). Later steps are
CachedRequestData diffs (computed count +1, a new block id when a block fills), as the
scheduler sends them. The first --warmup-steps are untimed; the next --decode-steps are
timed between device synchronisations. tok/s = batch / mean step time.
Prefill: one prompt of each --prefill-lens, chunked by --chunk tokens per step (the engine's
max_num_batched_tokens), timed from the first chunk to the sampled token.

Rooflines (the figure printed beside each result is roofline time / measured time; the
arithmetic is in gpu_roofline.py):
- bandwidth B = bytes read + bytes written / seconds of a large device-to-device copy,
  measured at start (--copy-gib); matmul rate F = 2 n^3 / seconds of an n x n x n matmul in
  the model dtype (--matmul-size).
- decode step >= (all non-expert weight bytes (the tied embedding counted once: the lm_head
  reads it whole) + A x moe_layers x bytes of one routed expert + KV bytes of every key the
  batch's sequences attend to, mean over the timed steps) / B. A = distinct experts a layer
  activates per step: measured from the router's per-expert token counts during the warm-up
  steps (model.expert_load), else the expected coverage of uniform routing
  E * (1 - (1 - k/E)^batch) (64 experts, top-6: 6 at batch 1, 61.3 at 32, 63.9 at 64).
  KV writes, activations and logits are left out (well under 1% of the bytes).
- prefill >= (2 x tokens x weights a token multiplies (attention, dense and shared MLPs,
  router, k routed experts) + 4 x heads x head_dim x layers x causal (query, key) pairs
  L(L+1)/2 + the lm_head of the sampled row) / F.

When distinct KV blocks for a case do not fit in device memory (after --kv-reserve-gib), its
requests share physical blocks (block ids wrap around the pool); such rows say "KV aliased"
and read less distinct memory than a real batch would. An H200 needs no aliasing.

Run on one GPU: `python benchmarks/bench_gpu.py --out gpu.json`. Sized to finish within 8
minutes on one H200: no case starts after --time-budget-s, later ones are reported as skipped. `--smoke` runs the same code on a CPU with
the `tiny` preset in float32 at toy sizes in seconds (CI). A case that fails or runs out of
memory is reported as such and the rest still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import asdict
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
from common import OUT_DIR, code_version
from gpu_roofline import (
    ROOFLINE_TEXT,
    ModelCosts,
    calibrate,
    decode_roofline,
    model_costs,
    prefill_flops,
    synchronize,
)
from gpu_steps import blocks_for, decode_outputs, prefill_outputs

BLOCK_SIZE = 16
LONG_PROMPT = 16384
"""Prompts longer than this are timed once, whatever --prefill-repeats says."""
TORCH_MAX_CONTEXT = 16384
"""The torch reference backend's cases past this context are skipped: it materialises the
gathered keys (and a prefix mask) and runs out of memory at 128K."""

SMOKE_DEFAULTS = {
    "preset": "tiny",
    "dtype": "float32",
    "device": "cpu",
    "backends": "torch",
    "batches": "1,2",
    "contexts": "32,64",
    "mixed": "3x32+1x128",
    "prefill_lens": "64,256",
    "chunk": 64,
    "warmup_steps": 2,
    "decode_steps": 3,
    "prefill_repeats": 1,
    "copy_gib": 1 / 64,
    "matmul_size": 256,
    "kv_reserve_gib": 0.0,
    "out": str(OUT_DIR / "bench_gpu-smoke.json"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--preset", default="full", help="model shape (default full: the real 21B-A3B)")
    add("--dtype", default="bfloat16", help="weights, activations and KV cache dtype")
    add("--device", default="cuda", help="torch device: cuda, cuda:1, ... (cpu for --smoke)")
    add(
        "--backends",
        default="triton",
        help="attention backends, one after another (the torch reference skips contexts and "
        f"prompts past {TORCH_MAX_CONTEXT} tokens: it gathers every key)",
    )
    add("--modes", default="graphs,eager", help="decode with CUDA graphs and/or enforce_eager")
    add("--batches", default="1,32,64", help="decode batch sizes")
    add("--contexts", default="4K,16K", help="decode contexts (every batch at every context)")
    add(
        "--mixed",
        default="63x4K+1x128K",
        help="extra decode batches of mixed contexts, comma-separated ('' for none); a context "
        "is capped at max_model_len minus the steps it decodes",
    )
    add("--prefill-lens", default="8K,128K", help="prefill prompt lengths")
    add("--chunk", type=int, default=8192, help="prefill tokens per step (max_num_batched_tokens)")
    add("--warmup-steps", type=int, default=3, help="untimed decode steps per case (>= 1)")
    add("--decode-steps", type=int, default=16, help="timed decode steps per case")
    add(
        "--prefill-repeats",
        type=int,
        default=3,
        help=f"timed runs per prompt after one warm-up (prompts over {LONG_PROMPT} run once)",
    )
    add("--copy-gib", type=float, default=4.0, help="size of the bandwidth-probe copy (GiB)")
    add("--matmul-size", type=int, default=8192, help="n of the n x n x n matmul-rate probe")
    add(
        "--kv-reserve-gib",
        type=float,
        default=20.0,
        help="device memory kept free beside the KV cache (activations, graph pools, the torch "
        "backend's gathered keys); less room for KV means aliased blocks",
    )
    add(
        "--time-budget-s",
        type=float,
        default=360.0,
        help="no case starts after this many seconds; later cases are reported as skipped",
    )
    add("--seed", type=int, default=0, help="seeds the random weights and prompts")
    add("--out", default=str(OUT_DIR / "bench_gpu.json"), help="where the JSON report goes")
    add(
        "--smoke",
        action="store_true",
        help="CPU check of the whole script in seconds; its defaults: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE_DEFAULTS.items()),
    )
    known, _ = parser.parse_known_args(argv)
    if known.smoke:
        parser.set_defaults(**SMOKE_DEFAULTS)
    args = parser.parse_args(argv)
    if min(args.warmup_steps, args.decode_steps, args.prefill_repeats, args.chunk) < 1:
        parser.error("--warmup-steps, --decode-steps, --prefill-repeats and --chunk must be >= 1")
    if not set(parse_list(args.modes)) <= {"graphs", "eager"}:
        parser.error(f"--modes takes graphs and/or eager, got {args.modes!r}")
    return args


def parse_count(text: str) -> int:
    """'4096' or '4K' (x1024) -> tokens."""
    text = text.strip()
    return int(text[:-1]) * 1024 if text[-1:] in ("k", "K") else int(text)


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def decode_cases(args: argparse.Namespace, max_len: int) -> list[tuple[str, list[int]]]:
    """(name, the context of each sequence) per case; '63x4K+1x128K' is 63 of 4096 and one of
    131072, each capped so its timed steps stay within max_len."""
    cap = max_len - args.warmup_steps - args.decode_steps
    specs = [f"{b}x{c}" for c in parse_list(args.contexts) for b in parse_list(args.batches)]
    cases = []
    for spec in specs + parse_list(args.mixed):
        terms = [term.split("x") for term in spec.split("+")]
        contexts = [min(parse_count(c), cap) for n, c in terms for _ in range(int(n))]
        name = "+".join(f"{int(n)}x{parse_count(c)}" for n, c in terms)
        cases.append((name, contexts))
    return cases


def brief(exc: BaseException) -> str:
    """'Type: first line of the message', at most 300 characters (for tables and JSON)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_model(config, dtype: torch.dtype, device: torch.device, backend, seed: int):
    """The model with random weights, made in place on `device` (no host copy)."""
    from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM

    with torch.device(device):
        model = Ernie4_5_MoeForCausalLM(config, dtype, backend=backend)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                param.zero_()
            else:  # router too: logits of std ~0.02 * sqrt(hidden) ~ 1 spread the tokens
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def moe_method(model) -> str:
    """The routed-expert kernels the model's "auto" method picks on its device."""
    try:
        from ernie_cluster.model.fused_moe import resolve_method

        experts = next(layer.mlp.experts for layer in model.layers if layer.is_moe)
        probe = torch.empty(
            1, model.config.hidden_size, dtype=model.dtype, device=experts.gate_up_proj.device
        )
        return resolve_method(experts.method, probe, experts.gate_up_proj)
    except Exception as exc:  # a diagnostic only: never fail the run for it
        return f"unknown ({type(exc).__name__})"


# ---------------------------------------------------------------------------------------------
# Driving the runner


def make_runner(model, num_blocks: int, args, backend: str, eager: bool, max_seqs: int):
    """A ModelRunner as a worker builds one (KV cache bound, decode graphs captured unless
    eager)."""
    from ernie_cluster.config.engine_config import EngineConfig
    from ernie_cluster.worker.model_runner import ModelRunner

    config = EngineConfig(
        model=f"random:{args.preset}",
        dtype=args.dtype,
        device=args.device,
        max_model_len=model.config.max_position_embeddings,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=args.chunk,
        block_size=BLOCK_SIZE,
        num_kv_blocks=num_blocks,
        enable_prefix_caching=False,
        seed=args.seed,
        show_progress=False,
        attention_backend=backend,
        enforce_eager=eager,
    )
    runner = ModelRunner(model, num_blocks, config, torch.device(args.device))
    runner.capture_cuda_graphs()
    return runner


def graphs_captured(runner) -> bool:
    return runner is not None and (
        runner.cuda_graphs is not None or runner.piecewise_graphs is not None
    )


def mode_label(entry: dict) -> str:
    """'graphs' only for a runner that captured graphs; a graphs run without is 'no-graph'."""
    if entry["mode"] == "graphs" and not entry.get("cuda_graphs"):
        return "no-graph"
    return entry["mode"]


def torch_skip(name: str, tokens: int) -> str | None:
    if name == "torch" and tokens > TORCH_MAX_CONTEXT:
        return f"torch backend past {TORCH_MAX_CONTEXT} tokens (gathers every key)"
    return None


def free_device_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


class RunnerSlot:
    """A ModelRunner built on first use. A failed step drops it (its per-request state is then
    unknown; the next case builds a fresh one); a failed build is not retried (a graph capture
    that ran out of memory would again). Keeps what the build cost in time and memory."""

    def __init__(self, build, model, device: torch.device) -> None:
        self.build = build
        self.model = model
        self.device = device
        self.runner = None
        self.info: dict = {"build_seconds": None, "build_error": None}

    def run(self, fn):
        if self.info["build_error"] is not None:
            raise RuntimeError(f"runner could not be built: {self.info['build_error']}")
        if self.runner is None:
            release(self.device)
            free_before = free_device_bytes(self.device)
            start = time.perf_counter()
            try:
                self.runner = self.build()
            except Exception as exc:
                self.info["build_error"] = brief(exc)
                self.drop()
                raise
            self.info["build_seconds"] = time.perf_counter() - start
            kv_bytes = sum(t.numel() * t.element_size() for t in self.runner.kv_caches)
            self.info["kv_cache_bytes"] = kv_bytes
            if free_before is not None:
                # graph pools, the persistent batch, cached activations: all but the KV cache
                taken = free_before - free_device_bytes(self.device)
                self.info["device_bytes_beside_kv"] = taken - kv_bytes
        try:
            return fn(self.runner)
        except Exception:
            self.drop()
            raise

    def drop(self) -> None:
        """Forget the runner and its KV cache."""
        self.runner = None
        # NOTE: the runner bound its caches into the model's layers; unbound, they are freed
        # before the next runner allocates its own (two 60 GB caches do not fit).
        self.model.bind_kv_caches([None] * len(self.model.layers))


def expert_counts(model) -> torch.Tensor | None:
    """Cumulative tokens per expert [moe_layers, experts], or None if the model keeps none."""
    try:
        return model.expert_load().clone()
    except (AttributeError, RuntimeError):
        return None


def finish(runner, req_ids: list[str]) -> None:
    from ernie_cluster.step_io import SchedulerOutput

    runner.execute_model(SchedulerOutput(finished_req_ids=list(req_ids)))


def decode_case(runner, model, contexts, args, num_blocks, tag, costs, calib) -> dict:
    warmup, steps = args.warmup_steps, args.decode_steps
    batch = len(contexts)
    req_ids = [f"{tag}-{i}" for i in range(batch)]
    outputs, aliased = decode_outputs(
        req_ids,
        contexts,
        warmup + steps,
        num_blocks,
        BLOCK_SIZE,
        model.config.vocab_size,
        args.seed,
    )
    active: list[float] = []
    for out in outputs[:warmup]:
        before = expert_counts(model)
        runner.execute_model(out)
        after = expert_counts(model)
        if before is not None and after is not None and int((after - before).sum()) > 0:
            active.append(float(((after - before) > 0).sum(1).float().mean()))
    device = torch.device(args.device)
    step_seconds = []
    synchronize(device)
    start = time.perf_counter()
    for out in outputs[warmup:]:
        step_start = time.perf_counter()
        result = runner.execute_model(out)  # host token ids: returns when the step is done
        step_seconds.append(time.perf_counter() - step_start)
    synchronize(device)
    total = time.perf_counter() - start
    finish(runner, req_ids)
    if len(result.sampled_token_ids) != batch:
        raise RuntimeError(f"{len(result.sampled_token_ids)} of {batch} requests sampled")
    kv_tokens = sum(contexts) + batch * (warmup + (steps - 1) / 2)  # keys read, mean step
    roofline = decode_roofline(
        costs,
        calib["copy_bandwidth_bytes_per_s"],
        batch,
        kv_tokens,
        statistics.mean(active) if active else None,
    )
    return {
        "step_seconds_mean": total / steps,
        "step_seconds_p50": statistics.median(step_seconds),
        "tokens_per_s": batch * steps / total,
        "kv_tokens_per_step": kv_tokens,
        "kv_aliased": aliased,
        **roofline,
        "roofline_fraction": roofline["roofline_step_seconds"] * steps / total,
    }


def prefill_once(runner, model, prompt_len, args, num_blocks, tag) -> tuple[float, bool]:
    outputs, aliased = prefill_outputs(
        tag, prompt_len, args.chunk, num_blocks, BLOCK_SIZE, model.config.vocab_size, args.seed
    )
    device = torch.device(args.device)
    synchronize(device)
    start = time.perf_counter()
    for out in outputs:
        result = runner.execute_model(out)
    synchronize(device)
    seconds = time.perf_counter() - start
    finish(runner, [tag])
    if tag not in result.sampled_token_ids:
        raise RuntimeError(f"prefill of {prompt_len} tokens sampled no token")
    return seconds, aliased


def prefill_case(runner, model, prompt_len, args, num_blocks, tag, costs, calib) -> dict:
    repeats = 1 if prompt_len > LONG_PROMPT else args.prefill_repeats
    runs = [
        prefill_once(runner, model, prompt_len, args, num_blocks, f"{tag}-{i}")
        for i in range(repeats)
    ]
    seconds = statistics.median(s for s, _ in runs)
    flops = prefill_flops(costs, prompt_len)
    roofline = flops / calib["matmul_flops_per_s"]
    return {
        "seconds": seconds,
        "seconds_all": [s for s, _ in runs],
        "tokens_per_s": prompt_len / seconds,
        "kv_aliased": any(a for _, a in runs),
        "flops": flops,
        "roofline_seconds": roofline,
        "roofline_fraction": roofline / seconds,
    }


def guarded(entry: dict, fn, deadline: float, device: torch.device) -> dict:
    """fn()'s figures into entry, with status ok / skipped / oom / error instead of raising."""
    if time.perf_counter() > deadline:
        entry["status"], entry["error"] = "skipped", "time budget spent (--time-budget-s)"
        return entry
    try:
        entry.update(fn())
        entry["status"] = "ok"
    except torch.cuda.OutOfMemoryError as exc:
        entry["status"], entry["error"] = "oom", brief(exc)
    except Exception as exc:
        entry["status"], entry["error"] = "error", brief(exc)
    if entry["status"] != "ok":
        release(device)  # after the except block: its traceback no longer holds the tensors
    return entry


def kv_blocks(needed: int, args, costs: ModelCosts, device: torch.device) -> int:
    """`needed` blocks, or as many as fit beside --kv-reserve-gib of free device memory."""
    if device.type != "cuda":
        return needed
    release(device)  # memory the allocator caches counts as taken
    free, _ = torch.cuda.mem_get_info(device)
    room = free - args.kv_reserve_gib * 2**30
    return max(1, min(needed, int(room // (costs.kv_bytes_per_token * BLOCK_SIZE))))


def run_backend(name: str, args, config, dtype, calib, deadline: float, report: dict) -> None:
    """Every decode case in every mode, then every prefill, on this backend's model."""
    from ernie_cluster.attention.selector import get_attention_backend

    device = torch.device(args.device)
    max_len = config.max_position_embeddings
    cases = decode_cases(args, max_len)
    prompts = [min(parse_count(p), max_len) for p in parse_list(args.prefill_lens)]
    start = time.perf_counter()
    model = build_model(config, dtype, device, get_attention_backend(name, device), args.seed)
    costs = model_costs(model, dtype)
    report["model"] = asdict(costs)
    report.setdefault("moe_method", {})[name] = moe_method(model)
    print(
        f"  model built in {time.perf_counter() - start:.1f} s; routed experts run by "
        f"{report['moe_method'][name]}",
        flush=True,
    )
    span = args.warmup_steps + args.decode_steps
    needed = max(
        (sum(blocks_for(c + span, BLOCK_SIZE) for c in ctxs) for _, ctxs in cases), default=1
    )
    max_seqs = max((len(ctxs) for _, ctxs in cases), default=1)
    for mode in parse_list(args.modes) if cases else []:
        num_blocks = kv_blocks(needed, args, costs, device)
        eager = mode == "eager"
        build = partial(make_runner, model, num_blocks, args, name, eager, max_seqs)
        slot = RunnerSlot(build, model, device)
        for case, contexts in cases:
            entry = {"backend": name, "mode": mode, "case": case, "batch": len(contexts)}
            entry["contexts"] = {str(c): contexts.count(c) for c in sorted(set(contexts))}
            entry["cuda_graphs"] = False  # set from the runner once it is built
            tag = f"{name}-{mode}-{case}"
            measure = partial(
                decode_case,
                model=model,
                contexts=contexts,
                args=args,
                num_blocks=num_blocks,
                tag=tag,
                costs=costs,
                calib=calib,
            )
            skip = torch_skip(name, max(contexts))
            if skip:
                entry["status"], entry["error"] = "skipped", skip
            else:
                guarded(entry, partial(slot.run, measure), deadline, device)
                entry["cuda_graphs"] = graphs_captured(slot.runner)
            report["decode"].append(entry)
            print(f"  {describe(entry)}", flush=True)
        runner_info = {"backend": name, "kind": "decode", "mode": mode}
        report["runners"].append({**runner_info, "num_kv_blocks": num_blocks, **slot.info})
        slot.drop()  # its KV cache, before the next mode allocates one
        release(device)

    longest = max((p for p in prompts if not torch_skip(name, p)), default=1)
    num_blocks = kv_blocks(blocks_for(longest, BLOCK_SIZE), args, costs, device)

    def build_prefill_runner():
        runner = make_runner(model, num_blocks, args, name, True, 1)
        # warm-up: kernel compilation, GEMM algorithm choice
        prefill_once(runner, model, min(prompts), args, num_blocks, f"{name}-warm")
        return runner

    slot = RunnerSlot(build_prefill_runner, model, device)
    for prompt_len in prompts:
        entry = {"backend": name, "mode": "eager", "prompt_tokens": prompt_len}
        entry["chunk"], entry["num_chunks"] = args.chunk, -(-prompt_len // args.chunk)
        measure = partial(
            prefill_case,
            model=model,
            prompt_len=prompt_len,
            args=args,
            num_blocks=num_blocks,
            tag=f"{name}-prefill-{prompt_len}",
            costs=costs,
            calib=calib,
        )
        skip = torch_skip(name, prompt_len)
        if skip:
            entry["status"], entry["error"] = "skipped", skip
        else:
            guarded(entry, partial(slot.run, measure), deadline, device)
        report["prefill"].append(entry)
        print(f"  {describe(entry)}", flush=True)
    runner_info = {"backend": name, "kind": "prefill", "mode": "eager"}
    report["runners"].append({**runner_info, "num_kv_blocks": num_blocks, **slot.info})


# ---------------------------------------------------------------------------------------------
# Report


def short(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def case_label(case: str) -> str:
    terms = (term.split("x") for term in case.split("+"))
    return " + ".join(f"{n} x {short(int(c))}" for n, c in terms)


def describe(entry: dict) -> str:
    if "case" in entry:
        head = f"{entry['backend']} {mode_label(entry)} decode {case_label(entry['case'])}"
    else:
        head = f"{entry['backend']} prefill {short(entry['prompt_tokens'])}"
    if entry["status"] != "ok":
        return f"{head}: {entry['status'].upper()} {entry.get('error', '')}"
    return (
        f"{head}: {entry['tokens_per_s']:.1f} tok/s, {entry['roofline_fraction']:.2f} of roofline"
    )


def note(entry: dict) -> str:
    if entry["status"] != "ok":
        return f"{entry['status'].upper()}: {entry.get('error', '')}"[:100]
    return "KV aliased" if entry["kv_aliased"] else ""


def print_tables(report: dict) -> None:
    settings = report["settings"]
    print(
        f"\ndecode: tok/s = batch / mean step time over {settings['decode_steps']} steps after "
        f"{settings['warmup_steps']} warm-up steps; 'of roof' = roofline step time / measured"
    )
    print(
        f"{'backend':<8} {'mode':<8} {'batch':<17} {'tok/s':>9} {'step ms':>8} "
        f"{'roof ms':>8} {'of roof':>7} {'experts':>8}  note"
    )
    for e in report["decode"]:
        figures = " " * 45
        if e["status"] == "ok":
            figures = (
                f"{e['tokens_per_s']:>9.1f} {1e3 * e['step_seconds_mean']:>8.2f} "
                f"{1e3 * e['roofline_step_seconds']:>8.2f} {e['roofline_fraction']:>7.2f} "
                f"{e['active_experts_per_layer']:>7.1f}{e['active_experts_source'][0]}"
            )
        label = mode_label(e)
        print(f"{e['backend']:<8} {label:<8} {case_label(e['case']):<17} {figures}  {note(e)}")
    print("experts: distinct routed experts per layer per step (m measured, u uniform routing)")
    print(
        f"\nprefill: one prompt in {settings['chunk']}-token steps (eager), first step to "
        "sampled token; 'of roof' = FLOP roofline time / measured time"
    )
    print(
        f"{'backend':<8} {'prompt':>7} {'steps':>6} {'seconds':>9} {'tok/s':>9} "
        f"{'roof s':>8} {'of roof':>7}  note"
    )
    for e in report["prefill"]:
        figures = " " * 36
        if e["status"] == "ok":
            figures = (
                f"{e['seconds']:>9.3f} {e['tokens_per_s']:>9.0f} "
                f"{e['roofline_seconds']:>8.3f} {e['roofline_fraction']:>7.2f}"
            )
        prompt = short(e["prompt_tokens"])
        print(f"{e['backend']:<8} {prompt:>7} {e['num_chunks']:>6} {figures}  {note(e)}")
    print_graph_gains(report)
    print("\nrunners (build = KV cache allocation + graph capture; prefill: + one warm-up prompt)")
    for r in report["runners"]:
        head = f"{r['backend']:<8} {r['kind']:<8} {r['mode']:<7} {r['num_kv_blocks']:>7} KV blocks"
        if r["build_seconds"] is None:
            print(f"{head}: not built {r['build_error'] or '(no case ran)'}")
            continue
        beside = r.get("device_bytes_beside_kv")
        extra = "" if beside is None else f", {beside / 2**30:.2f} GiB beside the KV cache"
        print(
            f"{head} ({r['kv_cache_bytes'] / 2**30:.1f} GiB): built in {r['build_seconds']:.1f} s{extra}"
        )
    for name, error in report.get("backend_errors", {}).items():
        print(f"backend {name} FAILED before its first case: {error}")


def print_graph_gains(report: dict) -> None:
    """Decode tok/s with CUDA graphs over tok/s eager, per backend and case."""
    rates = {
        (e["backend"], e["mode"], e["case"]): e["tokens_per_s"]
        for e in report["decode"]
        if e["status"] == "ok" and (e["cuda_graphs"] or e["mode"] == "eager")
    }
    if any(mode_label(e) == "no-graph" for e in report["decode"]):
        print(
            f"\nno CUDA graphs captured on {report['settings']['device']}: 'no-graph' rows ran eagerly"
        )
    pairs = [
        (backend, case, rate / rates[(backend, "eager", case)])
        for (backend, mode, case), rate in rates.items()
        if mode == "graphs" and (backend, "eager", case) in rates
    ]
    if pairs:
        print("\nCUDA graphs speed-up (graphs tok/s / eager tok/s)")
        for backend, case, gain in pairs:
            print(f"{backend:<8} {case_label(case):<17} {gain:>6.2f}x")


def machine_line(device: torch.device) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    versions = f"torch {torch.__version__}, triton {triton_version}"
    where = "cpu"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    # NOTE: not common.machine_summary, which imports transformers to name its version
    host = f"{platform.machine()} host, {os.cpu_count()} cores, Python {platform.python_version()}"
    return f"{where}; {versions}; {host}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ernie_cluster.config.model_config import ErnieMoeConfig
    from ernie_cluster_tools.fixtures.presets import preset_config

    started = time.perf_counter()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    config = ErnieMoeConfig.from_dict(preset_config(args.preset))
    report: dict = {
        "benchmark": "bench_gpu",
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_line(device),
        "code": code_version(),
        "settings": vars(args),
        "roofline": ROOFLINE_TEXT,
    }
    print(f"bench_gpu: preset {args.preset}, {args.dtype}, random weights on {device}")
    print(f"machine: {report['machine']}")
    print(f"code: {report['code']}")
    calib = calibrate(device, dtype, int(args.copy_gib * 2**30), args.matmul_size)
    release(device)
    print(
        f"calibration: copy {calib['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s (read + "
        f"written), {args.dtype} matmul {calib['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s"
    )
    for kind, text in ROOFLINE_TEXT.items():
        print(f"roofline {kind}: {text}")
    report.update(calibration=calib, model=None, runners=[], decode=[], prefill=[])
    for name in parse_list(args.backends):
        print(f"backend {name}:", flush=True)
        try:
            run_backend(name, args, config, dtype, calib, started + args.time_budget_s, report)
        except Exception as exc:  # the backend or the model could not be built
            report.setdefault("backend_errors", {})[name] = brief(exc)
            print(f"  FAILED: {brief(exc)}")
        release(device)  # the model, before the next backend builds its own
    report["wall_seconds"] = time.perf_counter() - started
    if report["model"]:
        c = report["model"]
        print(
            f"\nmodel: {c['num_parameters']:,} parameters ({c['parameter_bytes'] / 1e9:.2f} GB), "
            f"non-expert {c['non_expert_bytes'] / 1e9:.2f} GB, one expert "
            f"{c['expert_bytes'] / 1e6:.1f} MB x {c['num_experts']} x {c['num_moe_layers']} "
            f"layers, KV {c['kv_bytes_per_token']} B/token"
        )
    print_tables(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nJSON: {out} ({report['wall_seconds']:.0f} s)")
    failed = [e for e in report["decode"] + report["prefill"] if e["status"] in ("error", "oom")]
    return 1 if failed or "backend_errors" in report else 0


if __name__ == "__main__":
    raise SystemExit(main())
