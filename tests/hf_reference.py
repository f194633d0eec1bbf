"""Random checkpoints written by transformers' Ernie4_5_MoeForCausalLM: the numerical oracle.

Weights are re-drawn with a larger scale than transformers' default init so logits are well
separated (greedy ties would make token comparisons meaningless) and the router correction
biases are large enough to change which experts win.
"""

from __future__ import annotations

from pathlib import Path

import torch

BASE_CONFIG = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_intermediate_size=32,
    moe_num_experts=8,
    moe_k=2,
    moe_num_shared_experts=2,
    moe_layer_start_index=1,
    moe_layer_interval=1,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)


def make_hf_model(seed: int = 0, **overrides):
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    config = Ernie4_5_MoeConfig(**{**BASE_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = Ernie4_5_MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "e_score_correction_bias" in name:
                param.normal_(0.0, 0.2)
            elif "norm" in name:
                param.normal_(1.0, 0.1)
            elif "gate.weight" in name and "experts" not in name:
                param.normal_(0.0, 0.5)
            else:
                fan_in = param.shape[-1]
                param.normal_(0.0, 1.0 / fan_in**0.5)
    return model


def save_hf_checkpoint(directory: Path, seed: int = 0, **overrides) -> Path:
    model = make_hf_model(seed, **overrides)
    model.save_pretrained(directory, max_shard_size="200KB")
    return directory


@torch.no_grad()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab] float32 logits of the reference model."""
    return model(torch.tensor([token_ids])).logits[0].float()


@torch.no_grad()
def hf_greedy(model, token_ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([token_ids]),
        attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(token_ids) :].tolist()
