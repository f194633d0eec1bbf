"""Build a rank's model from a checkpoint directory: config, parameters, weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ernie_cluster.attention.backend import AttentionBackend
from ernie_cluster.attention.kv_quant import FP8_KV_CACHE_DTYPES, set_layer_kv_scales
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.distributed.communicator import Communicator
from ernie_cluster.loader.checkpoint_files import weight_map
from ernie_cluster.loader.compressed_tensors import CompressedTensorsReader, read_config
from ernie_cluster.loader.safetensors_loader import IGNORED_WHEN_TIED, load_weights
from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ernie_cluster.model.sharding import ShardSpec
from ernie_cluster.quantization.apply import quantize_model

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, config: ErnieMoeConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = config.torch_dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {[*DTYPES, 'auto']}")
    return DTYPES[name]


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = "auto",
    shard: ShardSpec | None = None,
    device: str | torch.device = "cpu",
    backend: AttentionBackend | None = None,
    config: ErnieMoeConfig | None = None,
    show_progress: bool = True,
    comm: Communicator | None = None,
    quantization: str | None = None,
    kv_cache_dtype: str | None = None,
) -> Ernie4_5_MoeForCausalLM:
    """The rank's model with its weights loaded; `quantization` (a --quantization method)
    quantizes them online once loaded (quantization/apply). A pre-quantized checkpoint
    (compressed-tensors, loader/compressed_tensors) keeps its own values and scales, and its
    per-layer KV-cache scales go to the attention layers unless `kv_cache_dtype` (the
    --kv-cache-dtype setting; None: not known here) says the cache is not fp8."""
    config = config or ErnieMoeConfig.from_pretrained(model_dir)
    torch_dtype = resolve_dtype(dtype, config)
    with torch.device(device):
        model = Ernie4_5_MoeForCausalLM(config, torch_dtype, shard, backend, comm)
    ignored = IGNORED_WHEN_TIED if config.tie_word_embeddings else ()
    prequantized = read_config(model_dir)
    reader = None
    if prequantized is not None:
        if quantization not in (None, prequantized.method):
            raise ValueError(
                f"the checkpoint is already quantized ({prequantized.description}, our "
                f"{prequantized.method!r}); drop --quantization {quantization} or pass "
                f"--quantization {prequantized.method}"
            )
        quantization = prequantized.method
        reader = CompressedTensorsReader(prequantized, weight_map(Path(model_dir)))
    load_weights(
        model.weight_targets(),
        model_dir,
        show_progress=show_progress,
        ignored=ignored,
        quantized=reader,
    )
    if reader is not None and reader.quantization.has_kv_scales:
        use_kv_scales(model, reader.kv_scales(len(model.layers)), kv_cache_dtype)
    if quantization is not None:
        given = None if reader is None else reader.pieces
        summary = quantize_model(model, quantization, model.comm, given_scales=given)
        if reader is not None:
            reader.close()
        logger.info(
            "%s: %d weights quantized, %.1f MB -> %.1f MB",
            quantization,
            summary.num_weights,
            summary.bytes_before / 1e6,
            summary.bytes_after / 1e6,
        )
    return model.eval()


def use_kv_scales(
    model: Ernie4_5_MoeForCausalLM, scales: list[tuple[float, float]], kv_cache_dtype: str | None
) -> None:
    """Each attention layer gets its (k_scale, v_scale) from the checkpoint, which an fp8 KV
    cache uses (attention/kv_quant); with another cache they are dropped, and the log says so.
    NOTE: kv_cache_dtype None (a caller that does not pass it) keeps them: a cache in the
    model dtype ignores its scales anyway."""
    if kv_cache_dtype is not None and kv_cache_dtype not in FP8_KV_CACHE_DTYPES:
        logger.info(
            "the checkpoint's KV-cache scales (kv_cache_scheme) are ignored: the KV cache is "
            "%r; --kv-cache-dtype fp8 uses them",
            kv_cache_dtype,
        )
        return
    for layer, (k_scale, v_scale) in zip(model.layers, scales, strict=True):
        set_layer_kv_scales(layer.self_attn, k_scale, v_scale)
    k_scales, v_scales = [k for k, _ in scales], [v for _, v in scales]
    logger.info(
        "KV-cache scales from the checkpoint for %d layers: k %.3g..%.3g, v %.3g..%.3g",
        len(scales),
        min(k_scales),
        max(k_scales),
        min(v_scales),
        max(v_scales),
    )
