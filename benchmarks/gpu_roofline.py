"""Rooflines for bench_gpu.py: the machine's rates measured on the spot, the model's bytes and
FLOPs counted from its parameters, and the lower bounds on decode and prefill time.

Bandwidth = bytes read + written per second of a large device-to-device copy; matmul rate =
2 n^3 / seconds of an n x n x n matmul in the model dtype. Decode is bound by bytes read,
prefill by FLOPs (ROOFLINE_TEXT says exactly how). Imported by bench_gpu.py, never by the
package.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

ROOFLINE_TEXT = {
    "bandwidth": "bytes read + bytes written per second of a device-to-device copy of "
    "--copy-gib GiB, measured at start",
    "matmul": "2 n^3 / seconds of an n x n x n matmul (--matmul-size) in the model dtype, "
    "measured at start",
    "decode": "step time >= (all non-expert weight bytes (the tied embedding once: the lm_head "
    "reads it whole) + A x MoE layers x bytes of one routed expert + KV bytes of every key the "
    "batch attends to, mean over the timed steps) / bandwidth; A = distinct experts per layer "
    "per step, measured from the router's per-expert counts in the warm-up steps, else the "
    "uniform-routing expectation E (1 - (1 - k/E)^batch); KV writes, activations and logits "
    "are left out",
    "prefill": "time >= (2 x prompt tokens x weights one token multiplies (attention, dense "
    "and shared MLPs, router, k routed experts) + 4 x heads x head_dim x layers x L(L+1)/2 "
    "causal (query, key) pairs + the lm_head of the sampled row) / matmul rate",
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(device: torch.device, fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def copy_seconds(device: torch.device, num_bytes: int) -> float:
    src = torch.ones(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return seconds_per_call(device, lambda: dst.copy_(src))


def matmul_seconds(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    return seconds_per_call(device, lambda: torch.mm(a, b, out=c))


def calibrate(
    device: torch.device, dtype: torch.dtype, copy_bytes: int, matmul_size: int
) -> dict[str, float]:
    """The device's copy bandwidth and matmul rate, measured now (run before the model is
    built, while the memory is free)."""
    n = matmul_size
    return {
        "copy_bytes": copy_bytes,
        "copy_bandwidth_bytes_per_s": 2 * copy_bytes / copy_seconds(device, copy_bytes),
        "matmul_size": n,
        "matmul_flops_per_s": 2 * n**3 / matmul_seconds(device, dtype, n),
    }


@dataclass
class ModelCosts:
    num_parameters: int
    parameter_bytes: int
    non_expert_bytes: int
    """Every parameter but the routed experts (the tied embedding once)."""
    expert_bytes: int
    """One routed expert of one MoE layer (gate, up and down)."""
    num_moe_layers: int
    num_experts: int
    top_k: int
    kv_bytes_per_token: int
    """K and V of one token, all layers."""
    matmul_flops_per_token: int
    """2 x the weights one token multiplies (k routed experts; no embedding, no lm_head)."""
    attention_flops_per_pair: int
    """QK^T and PV of one (query, key) pair, all heads and layers."""
    lm_head_flops_per_row: int


def model_costs(model: torch.nn.Module, kv_dtype: torch.dtype) -> ModelCosts:
    config = model.config
    moe_layers = [layer for layer in model.layers if layer.is_moe]
    expert_ids = {id(p) for layer in moe_layers for p in layer.mlp.experts.parameters()}
    head = model.embed_tokens if model.lm_head is None else model.lm_head
    vocab_ids = {id(model.embed_tokens), id(head)}
    params = list(model.parameters())
    experts = [p for p in params if id(p) in expert_ids]
    total_bytes = sum(p.numel() * p.element_size() for p in params)
    expert_total = sum(p.numel() * p.element_size() for p in experts)
    dense_numel = sum(
        p.numel() for p in params if p.dim() >= 2 and id(p) not in expert_ids | vocab_ids
    )
    num_slots = max(1, len(moe_layers) * config.moe_num_experts)  # (layer, expert) pairs
    per_expert_numel = sum(p.numel() for p in experts) // num_slots
    kv_itemsize = torch.empty(0, dtype=kv_dtype).element_size()
    kv_width = 2 * config.num_key_value_heads * config.head_dim
    return ModelCosts(
        num_parameters=sum(p.numel() for p in params),
        parameter_bytes=total_bytes,
        non_expert_bytes=total_bytes - expert_total,
        expert_bytes=expert_total // num_slots,
        num_moe_layers=len(moe_layers),
        num_experts=config.moe_num_experts,
        top_k=config.moe_k,
        kv_bytes_per_token=config.num_hidden_layers * kv_width * kv_itemsize,
        matmul_flops_per_token=2
        * (dense_numel + config.moe_k * len(moe_layers) * per_expert_numel),
        attention_flops_per_pair=4
        * config.num_attention_heads
        * config.head_dim
        * config.num_hidden_layers,
        lm_head_flops_per_row=2 * head.shape[0] * config.hidden_size,
    )


def uniform_active_experts(costs: ModelCosts, batch: int) -> float:
    """Expected distinct experts of a layer when `batch` tokens each pick k uniformly."""
    e, k = costs.num_experts, costs.top_k
    return e * (1 - (1 - k / e) ** batch)


def decode_roofline(
    costs: ModelCosts,
    bandwidth: float,
    batch: int,
    kv_tokens: float,
    measured_experts: float | None,
) -> dict[str, float | str]:
    """The least time a decode step of `batch` sequences attending to `kv_tokens` keys in all
    can take at `bandwidth` (see ROOFLINE_TEXT["decode"])."""
    uniform = uniform_active_experts(costs, batch)
    active = uniform if measured_experts is None else measured_experts
    num_bytes = (
        costs.non_expert_bytes
        + active * costs.num_moe_layers * costs.expert_bytes
        + kv_tokens * costs.kv_bytes_per_token
    )
    seconds = num_bytes / bandwidth
    return {
        "active_experts_per_layer": active,
        "active_experts_source": "uniform" if measured_experts is None else "measured",
        "active_experts_uniform": uniform,
        "roofline_bytes": num_bytes,
        "roofline_step_seconds": seconds,
        "roofline_tokens_per_s": batch / seconds,
    }


def prefill_flops(costs: ModelCosts, prompt_len: int) -> int:
    pairs = prompt_len * (prompt_len + 1) // 2  # causal: query p attends keys 0..p
    return (
        costs.matmul_flops_per_token * prompt_len
        + costs.attention_flops_per_pair * pairs
        + costs.lm_head_flops_per_row
    )


# ---------------------------------------------------------------------------------------------
# W > 1: ESTIMATES (no multi-GPU run has measured them): per-rank weight bytes and collectives.

COLLECTIVE_LATENCY_S = 12e-6
"""ESTIMATE: one small NCCL collective on NVLink within a node (10-15 us)."""
LINK_BYTES_PER_S = 450e9
"""ESTIMATE: NVLink 4 per direction per GPU (H100/H200 SXM, 900 GB/s both ways)."""
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
"""Datasheet HBM bandwidth (the measured copy rate is lower): ESTIMATE inputs only."""


def rank_weight_bytes(model: torch.nn.Module, world: int, active_experts: float) -> float:
    """Bytes of weights one rank reads per decode step at `world` ranks: attention heads and
    the vocabulary split W ways, the dense MLP / shared experts / norms / routers whole
    (replicated), and its share (1 / W) of the step's active routed experts."""
    split, whole, experts = 0, 0, 0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        if ".experts." in f".{name}." and "shared" not in name:
            experts += size
        elif "self_attn" in name or "embed_tokens" in name or "lm_head" in name:
            split += size
        else:
            whole += size
    config = model.config
    per_expert = experts / max(1, config.moe_num_experts)  # all MoE layers of one expert id
    return split / world + whole + active_experts / world * per_expert


def step_collectives(config, world: int, num_tokens: int, replicated: bool) -> tuple[int, int]:
    """(collectives, bytes one rank sends) of one decode step (distributed/layout): the layers
    plus the embedding's reduction, the logits gather and the sampled tokens' broadcast (and
    the sharded layout's logits all-gather)."""
    from ernie_cluster.distributed.layout import layer_traffic

    calls, sent = 0, 0
    for layer in range(config.num_hidden_layers):
        traffic = layer_traffic(
            replicated,
            num_tokens,
            world,
            config.hidden_size,
            config.moe_k,
            config.is_moe_layer(layer),
        )
        calls, sent = calls + traffic.collectives, sent + traffic.bytes_sent
    return calls + (3 if replicated else 4), sent


def multi_rank_table(model: torch.nn.Module, gpu: str = "H200") -> list[dict]:
    """ESTIMATED decode step per rank at W = 1, 2, 4 (before: token-sharded all-to-all; after:
    replicated all-reduce), bandwidth roofline + collective latency + link time."""
    config = model.config
    costs = model_costs(model, torch.bfloat16)
    rows = []
    for batch in (1, 8, 64):
        active = uniform_active_experts(costs, batch)
        for world in (1, 2, 4):
            hbm_s = rank_weight_bytes(model, world, active) / HBM_BYTES_PER_S[gpu]
            for layout in ("sharded", "replicated") if world > 1 else ("single",):
                calls, sent = step_collectives(config, world, batch, layout == "replicated")
                if world == 1:
                    calls, sent = 0, 0
                comm_s = calls * COLLECTIVE_LATENCY_S + sent / LINK_BYTES_PER_S
                rows.append(
                    {
                        "batch": batch,
                        "world": world,
                        "layout": layout,
                        "collectives_per_step": calls,
                        "bytes_sent_per_rank": sent,
                        "estimated_weights_ms": 1e3 * hbm_s,
                        "estimated_collectives_ms": 1e3 * comm_s,
                        "estimated_step_ms": 1e3 * (hbm_s + comm_s),
                    }
                )
    return rows


if __name__ == "__main__":
    # The full preset's counts, from a model made on the meta device (no memory, no GPU).
    from ernie_cluster.config.model_config import ErnieMoeConfig
    from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
    from ernie_cluster_tools.fixtures.presets import preset_config

    with torch.device("meta"):
        full = Ernie4_5_MoeForCausalLM(ErnieMoeConfig.from_dict(preset_config("full")))
    costs = model_costs(full, torch.bfloat16)
    print(costs)
    for batch in (1, 32, 64):
        print(f"batch {batch}: {uniform_active_experts(costs, batch):.1f} experts per layer")
    print(f"128K prefill: {prefill_flops(costs, 131072) / 1e15:.2f} PFLOP")
    print(
        "\nESTIMATES, not measurements (H200 datasheet HBM 4.8 TB/s, "
        f"{COLLECTIVE_LATENCY_S * 1e6:.0f} us per collective, {LINK_BYTES_PER_S / 1e9:.0f} GB/s "
        "NVLink): decode step per rank, bf16, uniform routing"
    )
    print(
        f"{'batch':>5} {'W':>2} {'layout':<10} {'colls':>6} {'KB sent':>8} "
        f"{'est weights ms':>14} {'est comm ms':>11} {'est step ms':>11}"
    )
    for row in multi_rank_table(full):
        print(
            f"{row['batch']:>5} {row['world']:>2} {row['layout']:<10} "
            f"{row['collectives_per_step']:>6} {row['bytes_sent_per_rank'] / 1e3:>8.1f} "
            f"{row['estimated_weights_ms']:>14.3f} {row['estimated_collectives_ms']:>11.3f} "
            f"{row['estimated_step_ms']:>11.3f}"
        )
