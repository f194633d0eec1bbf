"""vLLM's own ERNIE MTP layer on saved weights and inputs: the oracle of test_ernie_mtp.py.

Run by the interpreter of a vLLM install (a subprocess; pytest never imports this file):
`python vllm_ernie_mtp_oracle.py CHECKPOINT_DIR TENSORS OUT`. CHECKPOINT_DIR holds the
config.json vLLM builds the layer from; TENSORS (safetensors) the `model.mtp_*` weights plus
`embeds`, `positions` and `hidden`; OUT gets `out`. vLLM's module runs as it is, except its
paged-attention layer, which needs the engine's forward context: causal attention over the
sequence's rows stands in (one sequence, every row new).
"""

from __future__ import annotations

import sys
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


class CausalAttention(torch.nn.Module):
    """q [N, Hq*D], k and v [N, Hkv*D] -> [N, Hq*D], softmax(q k^T / sqrt(D)), causal."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, d = q.shape[0], self.head_dim
        q = q.view(n, self.num_heads, d).transpose(0, 1)  # [Hq, N, D]
        group = self.num_heads // self.num_kv_heads
        k = k.view(n, self.num_kv_heads, d).transpose(0, 1).repeat_interleave(group, 0)
        v = v.view(n, self.num_kv_heads, d).transpose(0, 1).repeat_interleave(group, 0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [Hq, N, D]
        return out.transpose(0, 1).reshape(n, self.num_heads * d)


def main(checkpoint: str, tensors_path: str, out_path: str) -> None:
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.models.ernie_mtp import ErnieMultiTokenPredictorLayer

    model_config = ModelConfig(model=checkpoint, dtype="float32", skip_tokenizer_init=True)
    vllm_config = VllmConfig(model_config=model_config)
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"file://{tempfile.mktemp()}",
            backend="gloo",
        )
        initialize_model_parallel(1, 1)
        config = model_config.hf_config
        layer = ErnieMultiTokenPredictorLayer(
            vllm_config, prefix=f"model.layers.{config.num_hidden_layers}"
        )
        attn = layer.mtp_block.self_attn
        attn.attn = CausalAttention(attn.num_heads, attn.num_kv_heads, attn.head_dim)
        t = load_file(tensors_path)
        block = "model.mtp_block.0."
        weights = {
            "mtp_emb_norm.weight": t["model.mtp_emb_norm.0.weight"],
            "mtp_hidden_norm.weight": t["model.mtp_hidden_norm.0.weight"],
            "mtp_linear_proj.weight": t["model.mtp_linear_proj.0.weight"],
            "mtp_block.self_attn.qkv_proj.weight": torch.cat(
                [t[f"{block}self_attn.{p}_proj.weight"] for p in "qkv"]
            ),
            "mtp_block.mlp.gate_up_proj.weight": torch.cat(
                [t[f"{block}mlp.{p}_proj.weight"] for p in ("gate", "up")]
            ),
        }
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.o_proj",
            "mlp.down_proj",
        ):
            weights[f"mtp_block.{name}.weight"] = t[f"{block}{name}.weight"]
        params = dict(layer.named_parameters())
        if set(params) != set(weights):
            raise SystemExit(f"vLLM's parameters {sorted(params)} != {sorted(weights)}")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
            # What vLLM's loader does after loading (CPU GEMM set-up).
            process_weights_after_loading(layer, model_config, torch.device("cpu"))
            out = layer(t["embeds"].clone(), t["positions"], t["hidden"])
    save_file({"out": out.contiguous()}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
