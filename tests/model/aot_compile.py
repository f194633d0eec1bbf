"""Compiles every Triton kernel of the GPU path ahead of time for one NVIDIA architecture, with
Triton's own compiler and no GPU, and prints one JSON line per compiled variant.

Each launcher runs as the model would call it, on `meta` tensors of the real model's shapes
(ERNIE-4.5-21B-A3B: hidden 2560, 20/4 heads of 128, 64 experts of 1536 top-6, 2 shared), once
per configuration its code can select (MoE tile configs, decode split counts, prefill tiles,
the kernels' flags, bfloat16 and float32: the engine's --dtype can pick either on a GPU), and
the quantized GEMMs (quantization/triton_gemm, the quantized MoE variants) for each storage
format with bfloat16 activations. e4m3 weights run as the target's
quantization/fp8_activations.fp8_variant says: W8A8 (activation rows quantized to e4m3, fp8
dots) from sm_89, and there also W8A16 with e4m3 loads (scale groups W8A8 cannot take); decoded
from their bytes with model-dtype activations on sm_80, where Triton refuses its fp8e4nv type.
`JITFunction.run` is replaced by a compile for the
target: the launcher's own arguments give the signature, constexprs and specialisation a GPU
launch would. Run by tests/model/test_triton_aot.py in a fresh process (TRITON_INTERPRET unset):
`python tests/model/aot_compile.py 90`, or `python tests/model/aot_compile.py 89 w8a8` for the
W8A8 kernels alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before any kernel is defined

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.attention.triton_cache import write_kv_triton
from ernie_cluster.attention.triton_decode import MAX_SPLITS, decode_attention
from ernie_cluster.attention.triton_prefill import prefill_attention
from ernie_cluster.model import fused_moe, triton_moe, triton_router
from ernie_cluster.model.triton_layers import rms_norm, rope_inplace, silu_and_mul
from ernie_cluster.quantization import fp8_activations, triton_gemm
from ernie_cluster.quantization.schemes import scheme_for
from ernie_cluster.quantization.weight import QuantizedWeight

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 2560, 20, 4, 128
EXPERTS, TOP_K, MOE_INTER, SHARED_INTER, DENSE_INTER = 64, 6, 1536, 3072, 12288
QUANT_METHODS = ("wint8", "wint4", "fp8", "block_wise_fp8")
FP8_METHODS = ("fp8", "block_wise_fp8")
TOKENS, BLOCK_SIZE, CONTEXT = 64, 16, 4096
META = "meta"


def empty(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device=META)


def attention_meta(query_lens: list[int], context: int) -> AttentionMetadata:
    num_seqs, num_tokens = len(query_lens), sum(query_lens)
    starts = torch.empty(num_seqs + 1, dtype=torch.int32, device=META)
    return AttentionMetadata(
        query_lens=query_lens,
        seq_lens=[context] * num_seqs,
        block_size=BLOCK_SIZE,
        slot_mapping=empty(num_tokens, dtype=torch.int64),
        query_start_loc=starts,
        seq_lens_tensor=empty(num_seqs, dtype=torch.int32),
        block_table=empty(num_seqs, context // BLOCK_SIZE + 3, dtype=torch.int32),
    )


def launch_moe(x: torch.Tensor, gate_up, down, dtype: torch.dtype) -> None:
    """The fused-MoE kernels in every tile config, with and without routing weights."""
    ids = empty(TOKENS, TOP_K, dtype=torch.int64)
    counts = empty(EXPERTS, dtype=torch.int64)
    for _, config in triton_moe.CONFIGS:
        num_pairs = TOKENS * TOP_K
        num_tiles = fused_moe.max_tiles(num_pairs, EXPERTS, config.block_m)
        tiles = triton_router.sort_to_tiles(ids, 0, EXPERTS, config.block_m, num_tiles, counts)
        for weights in (empty(TOKENS, TOP_K, dtype=dtype), None):
            triton_moe.run_experts(x, *tiles, weights, gate_up, down, TOP_K, config)


def launch_everything(dtype: torch.dtype) -> None:
    """Every launcher, in every configuration it can select, for activations in `dtype`."""
    x = empty(TOKENS, HIDDEN, dtype=dtype)
    weight = empty(HIDDEN, dtype=dtype)
    rms_norm(x, weight, 1e-5)
    rms_norm(x, weight, 1e-5, x)
    qkv = empty(TOKENS, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=dtype)
    q, k, v = qkv.view(TOKENS, -1, HEAD_DIM).split([HEADS, KV_HEADS, KV_HEADS], dim=1)
    rope_inplace(empty(TOKENS, 2, HEAD_DIM // 2, dtype=torch.float32), q, k)
    for inter in (SHARED_INTER, DENSE_INTER):
        silu_and_mul(empty(TOKENS, 2 * inter, dtype=dtype))
    gate = empty(EXPERTS, HIDDEN, dtype=torch.float32)
    bias = empty(EXPERTS, dtype=torch.float32)
    for is_real in (None, empty(TOKENS, dtype=torch.bool)):
        triton_router.route(x, gate, bias, TOP_K, 1e-12, is_real)
    ids = empty(TOKENS, TOP_K, dtype=torch.int64)
    gate_up, down = (
        empty(EXPERTS, 2 * MOE_INTER, HIDDEN, dtype=dtype),
        empty(EXPERTS, HIDDEN, MOE_INTER, dtype=dtype),
    )
    launch_moe(x, gate_up, down, dtype)
    weighted = empty(TOKENS * TOP_K, HIDDEN, dtype=dtype)
    for all_owned in (True, False):
        for add_to in (x, None):
            triton_router.combine(weighted, ids, 0, EXPERTS, dtype, all_owned, add_to)
    kv_cache = empty(2, 512 * BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype)
    decode = attention_meta([1] * TOKENS, CONTEXT)
    write_kv_triton(kv_cache, k, v, decode.slot_mapping)
    out = empty(TOKENS, HEADS, HEAD_DIM, dtype=dtype)
    # NOTE: choose_num_splits returns a power of two up to MAX_SPLITS. One split is its own
    # code path; above it the split kernel's code is the same whatever the count (a scalar),
    # and the merge kernel's tile grows with it, so 2 and MAX_SPLITS bound every other count.
    for num_splits in (1, 2, MAX_SPLITS):
        decode_attention(q, kv_cache, decode, HEAD_DIM**-0.5, out, num_splits=num_splits)
    prefill = attention_meta([TOKENS], CONTEXT)
    prefill_attention(q, kv_cache, prefill, HEAD_DIM**-0.5, out)


def launch_fp8_kv_cache(dtype: torch.dtype) -> None:
    """The attention kernels over an e4m3 KV cache (--kv-cache-dtype fp8): the write, every
    decode split path and prefill. sm_89+ only: Triton has no e4m3 below it, and the Triton
    backend refuses an fp8 cache there (the torch backend serves it)."""
    qkv = empty(TOKENS, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=dtype)
    q, k, v = qkv.view(TOKENS, -1, HEAD_DIM).split([HEADS, KV_HEADS, KV_HEADS], dim=1)
    kv_cache = empty(2, 512 * BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=torch.float8_e4m3fn)
    decode = attention_meta([1] * TOKENS, CONTEXT)
    write_kv_triton(kv_cache, k, v, decode.slot_mapping)
    out = empty(TOKENS, HEADS, HEAD_DIM, dtype=dtype)
    for num_splits in (1, 2, MAX_SPLITS):
        decode_attention(q, kv_cache, decode, HEAD_DIM**-0.5, out, num_splits=num_splits)
    prefill_attention(q, kv_cache, attention_meta([TOKENS], CONTEXT), HEAD_DIM**-0.5, out)


def quantized(method: str, *shape: int, dtype: torch.dtype) -> QuantizedWeight:
    """A `meta` QuantizedWeight [*, N, K] of `method` with its default scale groups."""
    scheme = scheme_for(method)
    *lead, cols = shape
    qweight = empty(*lead, cols // scheme.values_per_byte, dtype=scheme.storage)
    scale = empty(*lead, cols // (scheme.group_size or cols), dtype=torch.float32)
    return QuantizedWeight(qweight, scale, scheme, shape, dtype)


def launch_quantized(dtype: torch.dtype, methods: tuple[str, ...] = QUANT_METHODS) -> None:
    """The quantized GEMMs in every tile config, each storage format of `methods`: the dense
    layers' weights (qkv, o_proj, shared experts, the dense MLP) and the routed experts."""
    linears = [
        ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
        (HIDDEN, HEADS * HEAD_DIM),
        (2 * SHARED_INTER, HIDDEN),
        (HIDDEN, SHARED_INTER),
        (2 * DENSE_INTER, HIDDEN),
        (HIDDEN, DENSE_INTER),
    ]
    for method in methods:
        for num_tokens in (1, 64, 4096):  # one per tile config
            for shape in linears:
                x = empty(num_tokens, shape[1], dtype=dtype)
                triton_gemm.quantized_matmul(x, quantized(method, *shape, dtype=dtype))
        gate_up = quantized(method, EXPERTS, 2 * MOE_INTER, HIDDEN, dtype=dtype)
        down = quantized(method, EXPERTS, HIDDEN, MOE_INTER, dtype=dtype)
        launch_moe(empty(TOKENS, HIDDEN, dtype=dtype), gate_up, down, dtype)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's kernel, from cuobjdump (shipped with Triton)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", file.name], capture_output=True, text=True
        ).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def main(arch: int, parts: str = "all") -> None:
    """Compiles for sm_`arch`: every kernel (`parts` "all"), or the W8A8 ones alone ("w8a8")."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    seen: set[str] = set()

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(
            backend, kwargs, bound_args, specialization, options
        )
        variant = {
            "kernel": self._fn_name.rsplit(".", 1)[-1],
            "signature": {k: v for k, v in signature.items() if v != "constexpr"},
            "constexprs": {str(k): repr(v) for k, v in constexprs.items()},
            "num_warps": options.num_warps,
            "num_stages": options.num_stages,
        }
        key = json.dumps(variant, sort_keys=True)
        if key in seen:
            return
        seen.add(key)
        try:
            kernel = triton.compile(
                ASTSource(self, signature, constexprs, attrs),
                target=target,
                options=options.__dict__,
            )
        except Exception as exc:  # reported, and failed on, by the test
            print(
                json.dumps(variant | {"error": f"{type(exc).__name__}: {exc}"[:2000]}), flush=True
            )
            return
        usage = resource_usage(kernel.asm["cubin"])
        print(json.dumps(variant | {"shared": kernel.metadata.shared, **usage}), flush=True)

    JITFunction.run = compile_instead
    # The launchers ask the device how it runs e4m3 weights; here the target answers.
    variant = {"now": "w8a8" if arch >= 89 else "w8a16-bytes"}
    fp8_activations.fp8_variant = lambda device: variant["now"]
    with torch.inference_mode():
        if parts == "w8a8":
            if arch < 89:
                raise ValueError(f"W8A8 runs on sm_89 and later, not sm_{arch}")
            launch_quantized(torch.bfloat16, FP8_METHODS)
            return
        for dtype in (torch.bfloat16, torch.float32):
            launch_everything(dtype)
            if arch >= 89:
                launch_fp8_kv_cache(dtype)
        launch_quantized(torch.bfloat16)
        if arch >= 89:  # e4m3 loads with model-dtype activations (groups W8A8 cannot take)
            variant["now"] = "w8a16"
            launch_quantized(torch.bfloat16, FP8_METHODS)


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:3])
