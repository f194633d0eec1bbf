"""Dense ERNIE-4.5 (`ernie4_5`, the 0.3B's architecture) against transformers'
Ernie4_5ForCausalLM in float32: checkpoints transformers wrote (tied and untied head, head_dim
* heads != hidden_size as in the 0.3B) and the `tiny-dense` preset ours wrote, which
transformers reads."""

from __future__ import annotations

import pytest
import torch
from hf_reference import BASE_CONFIG, hf_greedy, hf_logits
from test_parity import assert_greedy_and_logprobs_match, our_logits, prompt_ids

from ernie_cluster import LLM, SamplingParams
from ernie_cluster.loader.model_loader import load_model
from ernie_cluster.model.moe import Ernie4_5_MoeSparseMoeBlock
from ernie_cluster_tools.fixtures.make_tiny import make_tiny_checkpoint

HF_DENSE = {k: v for k, v in BASE_CONFIG.items() if not k.startswith("moe_")} | {"head_dim": 32}
SOURCES = {
    "transformers-tied": {"tie_word_embeddings": True},
    "transformers-untied": {"tie_word_embeddings": False},
    "tiny-dense-preset": None,
}


def save_hf_dense(directory, seed: int, **overrides):
    """A random Ernie4_5ForCausalLM saved by transformers in shards; weights re-drawn at a
    scale that separates the logits (greedy ties would make token comparisons meaningless)."""
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    torch.manual_seed(seed)
    model = Ernie4_5ForCausalLM(Ernie4_5Config(**{**HF_DENSE, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    model.save_pretrained(directory, max_shard_size="100KB")
    return directory


@pytest.fixture(scope="module", params=sorted(SOURCES))
def dense(request, tmp_path_factory):
    """(transformers' model in float32, checkpoint directory)."""
    from transformers import Ernie4_5ForCausalLM

    path = tmp_path_factory.mktemp(request.param)
    overrides = SOURCES[request.param]
    if overrides is None:
        make_tiny_checkpoint(path, preset="tiny-dense", seed=0, force=True)
    else:
        save_hf_dense(path, seed=len(request.param), **overrides)
    hf, info = Ernie4_5ForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    # A name transformers did not find would be randomly initialised: a false oracle.
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf.eval(), path


def test_every_layer_is_the_dense_mlp(dense):
    hf_model, path = dense
    ours = load_model(path, dtype="float32", show_progress=False)
    assert ours.config.moe_layer_ids == []
    assert not any(isinstance(m, Ernie4_5_MoeSparseMoeBlock) for m in ours.modules())
    assert (ours.lm_head is None) == hf_model.config.tie_word_embeddings
    assert ours.config.q_size != ours.config.hidden_size


def test_float32_logits_match(dense):
    hf_model, path = dense
    ours = load_model(path, dtype="float32", show_progress=False)
    ids = prompt_ids(hf_model.config.vocab_size, 64)
    expected = hf_logits(hf_model, ids)
    got = our_logits(ours, ids)
    assert (got - expected).abs().max().item() < 1e-4


def test_greedy_continuation_and_logprobs_match(dense):
    assert_greedy_and_logprobs_match(*dense)


@pytest.mark.slow
def test_tp2_greedy_matches_transformers(tmp_path, ray_cluster):
    """On its own at W = 2: heads split over ranks, the dense MLP on each rank's rows."""
    from transformers import Ernie4_5ForCausalLM

    path = make_tiny_checkpoint(tmp_path / "dense", preset="tiny-dense", seed=3)
    hf = Ernie4_5ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [prompt_ids(512, n, seed=n) for n in (5, 40, 130)]
    expected = [hf_greedy(hf, ids, 24) for ids in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    with LLM(
        model=str(path),
        dtype="float32",
        show_progress=False,
        tensor_parallel_size=2,
        expert_parallel_size=2,
    ) as llm:
        outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outputs == expected
