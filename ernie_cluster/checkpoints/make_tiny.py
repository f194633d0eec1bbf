"""Write a random ERNIE-4.5 MoE checkpoint in the Hugging Face hub layout.

config.json, generation_config.json, two or more safetensors shards with an index, and the
tokenizer files. Deterministic: the same preset and seed give the same bytes. Router
correction biases are non-zero on purpose (zeros hide routing bugs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ernie_cluster.checkpoints.presets import preset_config
from ernie_cluster.checkpoints.tiny_tokenizer import write_tokenizer_files
from ernie_cluster.config.model_config import ErnieMoeConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Tensors kept in float32 whatever the checkpoint dtype, as in the real checkpoint.
FLOAT32_SUFFIXES = ("mlp.gate.weight", "e_score_correction_bias")


def random_state_dict(config: ErnieMoeConfig, seed: int) -> dict[str, torch.Tensor]:
    """Checkpoint-named float32 tensors; scaled so activations stay O(1) through the layers."""
    gen = torch.Generator().manual_seed(seed)
    hidden = config.hidden_size

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) / math.sqrt(in_features)

    def norm(size: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(size, generator=gen)

    def mlp(prefix: str, inter: int) -> None:
        tensors[f"{prefix}.gate_proj.weight"] = linear(inter, hidden)
        tensors[f"{prefix}.up_proj.weight"] = linear(inter, hidden)
        tensors[f"{prefix}.down_proj.weight"] = linear(hidden, inter)

    # NOTE: embeddings of norm ~1 keep the tied head's logits at a few units: sampling has
    # real entropy (a sharper model repeats one token and hides sampling bugs).
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": linear(config.vocab_size, hidden)
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = norm(hidden)
        tensors[f"{p}.post_attention_layernorm.weight"] = norm(hidden)
        tensors[f"{p}.self_attn.q_proj.weight"] = linear(config.q_size, hidden)
        tensors[f"{p}.self_attn.k_proj.weight"] = linear(config.kv_size, hidden)
        tensors[f"{p}.self_attn.v_proj.weight"] = linear(config.kv_size, hidden)
        tensors[f"{p}.self_attn.o_proj.weight"] = linear(hidden, config.q_size)
        if not config.is_moe_layer(i):
            mlp(f"{p}.mlp", config.intermediate_size)
            continue
        # Router logits of a few units: routing is decisive but the bias still flips choices.
        tensors[f"{p}.mlp.gate.weight"] = 3.0 * linear(config.moe_num_experts, hidden)
        tensors[f"{p}.mlp.moe_statics.e_score_correction_bias"] = 0.1 * torch.randn(
            1, config.moe_num_experts, generator=gen
        )
        for e in range(config.moe_num_experts):
            mlp(f"{p}.mlp.experts.{e}", config.moe_intermediate_size)
        if config.moe_num_shared_experts:
            mlp(f"{p}.mlp.shared_experts", config.shared_intermediate_size)
    tensors["model.norm.weight"] = norm(hidden)
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = linear(config.vocab_size, hidden)
    return tensors


def write_shards(
    tensors: dict[str, torch.Tensor], directory: Path, num_shards: int, dtype: torch.dtype
) -> None:
    names = list(tensors)
    per_shard = math.ceil(len(names) / num_shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    for shard in range(num_shards):
        file_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {}
        for name in names[shard * per_shard : (shard + 1) * per_shard]:
            keep32 = name.endswith(FLOAT32_SUFFIXES)
            tensor = tensors[name].to(torch.float32 if keep32 else dtype).contiguous()
            chunk[name] = tensor
            weight_map[name] = file_name
            total_size += tensor.numel() * tensor.element_size()
        save_file(chunk, str(directory / file_name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(directory / "model.safetensors.index.json", index)


def make_tiny_checkpoint(
    directory: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    num_shards: int = 2,
    overrides: dict | None = None,
    force: bool = False,
) -> Path:
    """Write a random checkpoint of `preset` into `directory` (created); returns the path.

    A directory that is not empty is refused unless `force`; then its old shards go, so no
    stale shard outlives the new index.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    raw = preset_config(preset)
    raw.update(overrides or {})
    raw["torch_dtype"] = dtype
    config = ErnieMoeConfig.from_dict(raw)
    out = prepare_directory(Path(directory), force)
    _write_json(out / "config.json", raw)
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "do_sample": True,
            "temperature": 1.0,
            "top_p": 0.95,
        },
    )
    write_shards(random_state_dict(config, seed), out, num_shards, DTYPES[dtype])
    write_tokenizer_files(out, vocab_size=config.vocab_size)
    return out


def prepare_directory(out: Path, force: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{str(out)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            entries = sorted(p.name for p in out.iterdir())
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ValueError(
                f"{str(out)!r} is not empty ({len(entries)} entries: {shown}); refusing to "
                "overwrite it: pick an empty or new directory, or pass --force"
            )
        for old in out.glob("model*.safetensors*"):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
