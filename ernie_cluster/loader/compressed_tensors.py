"""Pre-quantized checkpoints in the compressed-tensors format (what llm-compressor writes and
vLLM loads), read into our layout (quantization/schemes).

What a checkpoint says: `config.json`'s `quantization_config` (`quant_method:
"compressed-tensors"`), one config group of weight arguments for every `Linear` not in
`ignore`. What each quantized Linear `P` holds:

* pack-quantized (W4A16, W8A16): `P.weight_packed` int32 [N, K * bits / 32], the values
  stored as q + 2^(bits-1), lowest bits first (so its bytes are our wint4 layout as they are,
  and int8 after flipping the top bit); `P.weight_scale` [N, K / group] or [N, 1]; `P.weight_shape`.
* float-quantized / naive-quantized (FP8, FP8_DYNAMIC, FP8_BLOCK): `P.weight` float8_e4m3fn
  [N, K]; `P.weight_scale` [1] (tensor), [N, 1] (channel) or [ceil(N/b0), ceil(K/b1)] (block);
  `P.input_scale` for static activation scales (unused: activations stay in the model dtype,
  or are scaled per token by the W8A8 kernels, quantization/fp8_activations).

A `kv_cache_scheme` (llm-compressor's fp8 KV cache: static per-tensor e4m3 scales for K, taken
after RoPE, and V) adds `model.layers.N.self_attn.k_scale` and `v_scale`, one value each
(`kv_scales`); the loader gives them to the attention layers when the KV cache is fp8.

Dequantized, W = q * scale, the product rounded once to the model dtype: bit for bit what
compressed-tensors' own `decompress` returns for a bfloat16 checkpoint (tests compare against
digests of llm-compressor's output). The loader fills the model's dense parameters with those
values through `CompressedTensorsReader` and keeps the checkpoint's scales; quantization/apply
then quantizes with exactly those scales (`ScalePiece`s), which recovers the checkpoint's q (the dequantized
value is q * scale rounded by less than half a quantization step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ernie_cluster.model.weights import WeightTarget
from ernie_cluster.quantization.apply import ScalePiece
from ernie_cluster.quantization.schemes import unpack_int4

READABLE = (
    "compressed-tensors checkpoints (llm-compressor) with symmetric weights: pack-quantized int4 "
    "or int8 per channel or in groups (W4A16, W8A16), or float-quantized e4m3 per tensor, "
    "channel or block (FP8, FP8_DYNAMIC, FP8_BLOCK)"
)
_AUXILIARY = ("weight_scale", "weight_shape", "input_scale")
_KV_SCALES = ("k_scale", "v_scale")  # read by `kv_scales`, when the config declares them
HONOURED_KV_SCHEME = "float 8-bit, per tensor, static, symmetric (llm-compressor's fp8 KV cache)"
_UNSUPPORTED = {
    "weight_zero_point": "asymmetric weights (zero points)",
    "weight_g_idx": "activation-ordered groups (g_idx)",
}


@dataclass(frozen=True)
class CheckpointQuantization:
    """A checkpoint's weight quantization, in our terms."""

    method: str  # quantization/schemes: wint8, wint4, fp8, block_wise_fp8
    num_bits: int
    is_float: bool
    strategy: str  # tensor, channel, group, block
    group_size: int | None
    block: tuple[int, int] | None
    description: str  # for logs and errors: "W4A16 (pack-quantized int4, group 128)"
    has_kv_scales: bool = False  # per-layer k_scale / v_scale (kv_cache_scheme)


def read_checkpoint_quantization(raw_config: dict) -> CheckpointQuantization | None:
    """The `quantization_config` of a config.json dict, or None for an unquantized checkpoint.
    Raises ValueError, naming what we read, for any format or option we do not."""
    config = raw_config.get("quantization_config") or raw_config.get("compression_config")
    if not config:
        return None
    method = config.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(
            f"checkpoint quantization {method!r} is not supported; we read {READABLE}, or "
            "quantize an unquantized checkpoint at load with --quantization"
        )
    if config.get("sparsity_config"):
        raise ValueError(
            f"sparse compressed-tensors checkpoints are not supported; we read {READABLE}"
        )
    groups = list((config.get("config_groups") or {}).values())
    weights = [group.get("weights") for group in groups]
    if not groups or any(w is None for w in weights):
        raise ValueError("compressed-tensors config without weight quantization arguments")
    if any(w != weights[0] for w in weights[1:]):
        raise ValueError(
            f"mixed-precision compressed-tensors checkpoints (several weight schemes) are not "
            f"supported; we read {READABLE}"
        )
    args = weights[0]
    fmt = groups[0].get("format") or config.get("format")
    kind, bits, strategy = args.get("type"), args.get("num_bits"), args.get("strategy")
    problems = []
    if not args.get("symmetric", True):
        problems.append("asymmetric weights")
    if args.get("actorder"):
        problems.append(f"actorder {args['actorder']!r}")
    if args.get("dynamic"):
        problems.append("dynamic weight scales")
    if kind == "int" and (bits not in (4, 8) or fmt != "pack-quantized"):
        problems.append(f"int{bits} weights in format {fmt!r}")
    if kind == "float" and (bits != 8 or fmt not in ("float-quantized", "naive-quantized")):
        problems.append(f"float{bits} weights in format {fmt!r}")
    if kind not in ("int", "float"):
        problems.append(f"weight type {kind!r}")
    if strategy not in ("tensor", "channel", "group", "block") or (
        kind == "int" and strategy in ("tensor", "block")
    ):
        problems.append(f"strategy {strategy!r} for {kind} weights")
    if problems:
        raise ValueError(
            f"unsupported compressed-tensors checkpoint ({', '.join(problems)}); we read {READABLE}"
        )
    group_size = args.get("group_size") if strategy == "group" else None
    block = tuple(args["block_structure"]) if strategy == "block" else None
    if kind == "int":
        ours = "wint4" if bits == 4 else "wint8"
    else:
        ours = "block_wise_fp8" if strategy in ("block", "group") else "fp8"
    detail = (
        f"group {group_size}" if group_size else (f"block {block}" if block else f"per {strategy}")
    )
    description = f"{fmt} {kind}{bits}, {detail}"
    has_kv_scales = read_kv_cache_scheme(config.get("kv_cache_scheme"))
    return CheckpointQuantization(
        ours, bits, kind == "float", strategy, group_size, block, description, has_kv_scales
    )


def read_kv_cache_scheme(scheme: dict | None) -> bool:
    """Whether a `kv_cache_scheme` gives per-layer fp8 K/V scales; raises ValueError, naming
    what it read, for one we cannot honour (only static per-tensor e4m3 scales: the fp8 KV
    cache keeps one scale for K and one for V per layer)."""
    if not scheme:
        return False
    kind, bits, strategy = scheme.get("type"), scheme.get("num_bits"), scheme.get("strategy")
    problems = []
    if kind != "float" or bits != 8:
        problems.append(f"{kind}{bits} values")
    if strategy != "tensor":
        problems.append(f"strategy {strategy!r}")
    if scheme.get("dynamic"):
        problems.append(f"dynamic {scheme['dynamic']!r} scales")
    if not scheme.get("symmetric", True):
        problems.append("asymmetric scales")
    if problems:
        raise ValueError(
            f"unsupported kv_cache_scheme ({', '.join(problems)}; read {scheme}); we honour "
            f"{HONOURED_KV_SCHEME}, with --kv-cache-dtype fp8"
        )
    return True


@dataclass
class CompressedTensorsReader:
    """Serves the loader dense (dequantized) tensors under their unquantized names and keeps
    each copied slice's scales (`pieces`) for quantization/apply."""

    quantization: CheckpointQuantization
    files: dict[str, Path]
    pieces: list[ScalePiece] = field(default_factory=list)
    _handles: dict[Path, object] = field(default_factory=dict)

    def logical_files(self) -> dict[str, Path]:
        """Tensor name -> file, with each quantized Linear under `P.weight` alone."""
        out: dict[str, Path] = {}
        for name, file in self.files.items():
            prefix, _, leaf = name.rpartition(".")
            if leaf in _UNSUPPORTED:
                raise ValueError(
                    f"{name}: {_UNSUPPORTED[leaf]} are not supported; we read {READABLE}"
                )
            if leaf in _AUXILIARY or (leaf in _KV_SCALES and self.quantization.has_kv_scales):
                continue
            out[f"{prefix}.weight" if leaf == "weight_packed" else name] = file
        return out

    def is_quantized(self, name: str) -> bool:
        return name.endswith(".weight") and f"{name}_scale" in self.files

    def copy(self, name: str, target: WeightTarget) -> int:
        """Dequantize the target's slice of `name` into target.dest; keep its scales. Targets
        whose dest is None (another rank's) read nothing."""
        if target.dest is None:
            return 0
        prefix = name.removesuffix(".weight")
        full_rows, full_cols = target.full_shape
        rows = slice(0, full_rows)
        cols = slice(0, full_cols)
        stop = target.full_shape[target.src_dim] if target.src_stop is None else target.src_stop
        if target.src_dim == 0:
            rows = slice(target.src_start, stop)
        else:
            cols = slice(target.src_start, stop)
        values, read = self._values(prefix, rows, full_cols)  # [n, K] quantized values
        scale, group_cols = self._scales(prefix, rows, full_rows, full_cols)  # [n, G]
        per_col = scale.repeat_interleave(group_cols, dim=-1)[:, :full_cols]  # [n, K]
        dense = (values[:, cols].float() * per_col[:, cols]).to(target.dest.dtype)
        if tuple(dense.shape) != tuple(target.dest.shape):
            raise ValueError(
                f"tensor {name!r}: slice {list(dense.shape)} does not fit {list(target.dest.shape)}"
            )
        target.dest.copy_(dense)
        self.pieces.append(ScalePiece(target.dest, scale, group_cols, cols.start, cols.stop))
        return read

    def _tensor(self, name: str) -> Callable:
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file].get_slice(name)

    def _values(self, prefix: str, rows: slice, full_cols: int) -> tuple[torch.Tensor, int]:
        if self.quantization.is_float:
            data = self._tensor(f"{prefix}.weight")[rows]
            return data, data.numel()
        packed = self._tensor(f"{prefix}.weight_packed")[rows]  # [n, K * bits / 32] int32
        as_bytes = packed.contiguous().view(torch.uint8)  # little-endian: lowest bits first
        if self.quantization.num_bits == 4:
            values = unpack_int4(as_bytes)
        else:
            values = (as_bytes ^ 0x80).view(torch.int8)
        if values.shape[-1] != full_cols:
            raise ValueError(
                f"{prefix}.weight_packed holds {values.shape[-1]} columns, expected {full_cols}"
            )
        return values, packed.numel() * 4

    def _scales(
        self, prefix: str, rows: slice, full_rows: int, full_cols: int
    ) -> tuple[torch.Tensor, int]:
        """[n, G] float32 for the rows, and the checkpoint columns each scale covers."""
        scale = self._tensor(f"{prefix}.weight_scale")[:].float()
        q = self.quantization
        if q.strategy == "tensor" or scale.numel() == 1:
            return scale.reshape(1, 1).expand(rows.stop - rows.start, 1).clone(), full_cols
        if q.strategy == "block":
            block_rows, block_cols = q.block  # type: ignore[misc]
            per_row = scale.repeat_interleave(block_rows, dim=0)[:full_rows]
            return per_row[rows].contiguous(), block_cols
        groups = scale.shape[-1]
        return scale[rows].contiguous(), -(-full_cols // groups)

    def kv_scales(self, num_layers: int) -> list[tuple[float, float]]:
        """(k_scale, v_scale) of each of `num_layers` attention layers, as the checkpoint holds
        them (`model.layers.N.self_attn.k_scale` / `v_scale`, one positive value each)."""
        out = []
        for layer in range(num_layers):
            pair = []
            for leaf in ("k_scale", "v_scale"):
                name = f"model.layers.{layer}.self_attn.{leaf}"
                if name not in self.files:
                    raise ValueError(
                        f"the checkpoint's kv_cache_scheme promises {leaf} per layer, but "
                        f"{name!r} is missing"
                    )
                value = self._tensor(name)[:].float().flatten()
                if value.numel() != 1 or not (value.isfinite().all() and value.item() > 0):
                    raise ValueError(
                        f"{name} must be one positive finite value (per-tensor), got "
                        f"{value.tolist()}"
                    )
                pair.append(value.item())
            out.append((pair[0], pair[1]))
        return out

    def close(self) -> None:
        self._handles.clear()


def read_config(model_dir: str | Path) -> CheckpointQuantization | None:
    """The checkpoint's quantization from its config.json (None when it has none)."""
    import json

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    return read_checkpoint_quantization(raw)
