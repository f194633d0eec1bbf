"""Our model against transformers' Ernie4_5_MoeForCausalLM on random checkpoints it wrote."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_greedy, hf_logits, make_hf_model

from ernie_cluster import LLM, SamplingParams
from ernie_cluster.attention import AttentionMetadata
from ernie_cluster.loader.model_loader import load_model

VARIANTS = {
    "tied-start1-shared2": {},
    "untied": {"tie_word_embeddings": False},
    "start0": {"moe_layer_start_index": 0},
    "interval2-shared1": {
        "moe_layer_interval": 2,
        "moe_num_shared_experts": 1,
        "num_hidden_layers": 4,
    },
    "no-shared": {"moe_num_shared_experts": 0},
    "head-dim-24": {"head_dim": 24},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    overrides = VARIANTS[request.param]
    model = make_hf_model(seed=len(request.param), **overrides)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, max_shard_size="200KB")
    return model, path


def our_logits(model, token_ids: list[int]) -> torch.Tensor:
    n = len(token_ids)
    block_size = 16
    num_blocks = -(-n // block_size)
    attn = model.layers[0].self_attn
    model.bind_kv_caches(
        [
            torch.zeros(
                2, num_blocks * block_size, attn.num_kv_heads, attn.head_dim, dtype=model.dtype
            )
            for _ in model.layers
        ]
    )
    meta = AttentionMetadata.build([n], [n], [list(range(num_blocks))], block_size)
    hidden = model(torch.tensor(token_ids), torch.arange(n), meta)
    return model.compute_logits(hidden, torch.arange(n))


def prompt_ids(vocab: int, n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_checkpoint_is_sharded_and_per_expert(variant):
    _, path = variant
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) >= 2


def test_correction_bias_changes_routing(variant):
    model, _ = variant
    hidden = torch.randn(256, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    moe = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate"))
    probs = torch.softmax(hidden @ moe.gate.weight.T, -1)
    k = model.config.moe_k
    unbiased = torch.topk(probs, k).indices.sort().values
    biased = torch.topk(probs + moe.gate.moe_statics.e_score_correction_bias[0], k)
    changed = (unbiased != biased.indices.sort().values).any(-1).float().mean()
    assert changed > 0.05, f"bias changed only {changed:.1%} of routings"


def test_float32_logits_match(variant):
    hf_model, path = variant
    ours = load_model(path, dtype="float32", show_progress=False)
    ids = prompt_ids(hf_model.config.vocab_size, 64)
    expected = hf_logits(hf_model, ids)
    got = our_logits(ours, ids)
    assert (got - expected).abs().max().item() < 1e-4


def test_bfloat16_logits_match(variant, monkeypatch):
    from transformers import Ernie4_5_MoeForCausalLM

    from ernie_cluster import cpu_bf16

    # NOTE: where the model rounds to bfloat16 is checked here, with the same GEMM kernels
    # as transformers (oneDNN's). On a CPU without native bfloat16 ours widen GEMMs to
    # float32 instead: the same roundings, another order of additions (tests/model/
    # test_cpu_bf16.py), and on these random models any ulp flips a routing somewhere, so
    # logits then stand as far from transformers' as transformers' bfloat16 stands from
    # float32 (up to 0.8 relative).
    monkeypatch.setattr(cpu_bf16, "_cpu_paths", False)
    hf_model, path = variant
    # from_pretrained keeps the router and its bias in float32, as the real checkpoint does.
    reference = Ernie4_5_MoeForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert reference.model.layers[1].mlp.gate.weight.dtype == torch.float32
    ours = load_model(path, dtype="bfloat16", show_progress=False)
    ids = prompt_ids(hf_model.config.vocab_size, 64)
    expected = hf_logits(reference, ids)
    got = our_logits(ours, ids)
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel.item() < 2e-2


def test_greedy_continuation_and_logprobs_match(variant):
    assert_greedy_and_logprobs_match(*variant)


def assert_greedy_and_logprobs_match(hf_model, path) -> None:
    """32 greedy tokens of our engine equal transformers', each with 3 logprobs within 1e-4."""
    ids = prompt_ids(hf_model.config.vocab_size, 20, seed=7)
    expected_tokens = hf_greedy(hf_model, ids, 32)
    with LLM(model=str(path), dtype="float32", show_progress=False) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=3)
        out = llm.generate([ids], params)[0].outputs[0]
    assert out.token_ids == expected_tokens
    logprobs = torch.log_softmax(hf_logits(hf_model, ids + expected_tokens), -1)
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = logprobs[len(ids) - 1 + step]
        assert token in entry and len(entry) >= 3
        for token_id, value in entry.items():
            assert abs(value - row[token_id].item()) < 1e-4
