"""Writing the trained demo model as a checkpoint in the Hugging Face hub layout.

Owns the rename from transformers' in-memory layout (experts fused as `gate_up_proj`
[E, 2I, H] and `down_proj` [E, H, I]) to the per-expert tensor names of the real ERNIE
checkpoint, the dtypes (bfloat16, router weights and correction biases float32 as in the
real checkpoint) and the files beside the weights. It never trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from ernie_cluster_tools.fixtures.tiny_tokenizer import write_tokenizer_dir

WEIGHTS_FILE = "model.safetensors"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Kept in float32 whatever the checkpoint dtype, as in the real checkpoint.
FLOAT32_SUFFIXES = ("mlp.gate.weight", "e_score_correction_bias")


def checkpoint_tensors(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors of a transformers Ernie4_5_MoeForCausalLM."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            gate, up = value.chunk(2, dim=1)  # [E, I, H] each
            for e in range(value.shape[0]):
                tensors[f"{prefix}{e}.gate_proj.weight"] = gate[e]
                tensors[f"{prefix}{e}.up_proj.weight"] = up[e]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(value.shape[0]):
                tensors[f"{prefix}{e}.down_proj.weight"] = value[e]  # [H, I]
        else:
            # NOTE: transformers keeps the correction bias under the router module; the
            # checkpoint has it under the MoE block (mlp.moe_statics...).
            tensors[name.replace("mlp.gate.moe_statics.", "mlp.moe_statics.")] = value
    return {
        name: value.detach()
        .to(torch.float32 if name.endswith(FLOAT32_SUFFIXES) else dtype)
        .contiguous()
        for name, value in sorted(tensors.items())
    }


def save_checkpoint(
    model: torch.nn.Module,
    config: dict[str, Any],
    tokenizer: Tokenizer,
    chat_template: str,
    directory: str | Path,
    dtype: str = "bfloat16",
    generation: dict[str, Any] | None = None,
) -> Path:
    """config.json, generation_config.json, one safetensors file plus its index, tokenizer."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(model, DTYPES[dtype])
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(
        out / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict.fromkeys(tensors, WEIGHTS_FILE)},
    )
    _write_json(out / "config.json", {**config, "torch_dtype": dtype})
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **(generation or {})},
    )
    write_tokenizer_dir(out, tokenizer, chat_template)
    return out


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
