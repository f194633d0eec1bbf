"""The shipped demo checkpoint decodes the same greedy tokens in transformers'
Ernie4_5_MoeForCausalLM (float32), in our engine at W = 1, and sharded at TP2/EP2."""

from __future__ import annotations

import pytest
import torch

from ernie_cluster import LLM, SamplingParams
from ernie_cluster.checkpoints.demo import demo_checkpoint as shipped_checkpoint
from ernie_cluster.tokenizer import load_tokenizer
from ernie_cluster_tools.demo_model.conversations import generate_examples
from ernie_cluster_tools.demo_model.dataset import render_prompt
from ernie_cluster_tools.demo_model.pipeline import chat_template

MAX_TOKENS = 120
FAMILIES = ("weather_call", "weather_answer", "greeting", "follow_up_unit", "remember_name")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tokenizer = load_tokenizer(shipped_checkpoint())
    template = chat_template()
    examples = [
        example
        for family in FAMILIES
        for example in generate_examples(2, seed=99, split="heldout", families=(family,))
    ]
    return [tokenizer.encode(render_prompt(template, e)) for e in examples]


@pytest.fixture(scope="module")
def stop_ids() -> list[int]:
    tokenizer = load_tokenizer(shipped_checkpoint())
    return [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("</s>")]


def greedy(prompts: list[list[int]], **engine) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    with LLM(
        model=str(shipped_checkpoint()), dtype="float32", show_progress=False, **engine
    ) as llm:
        return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def single_rank(prompts) -> list[list[int]]:
    return greedy(prompts)


def test_transformers_gives_the_same_greedy_tokens(prompts, stop_ids, single_rank):
    from transformers import Ernie4_5_MoeForCausalLM

    model = Ernie4_5_MoeForCausalLM.from_pretrained(
        shipped_checkpoint(), dtype=torch.float32
    ).eval()
    for prompt, ours in zip(prompts, single_rank, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=0,
            )
        assert out[0, len(prompt) :].tolist() == ours
    assert any(tokens[-1] in stop_ids for tokens in single_rank)


@pytest.mark.slow
def test_tp2_ep2_gives_the_same_greedy_tokens(prompts, single_rank, ray_cluster):
    assert greedy(prompts, tensor_parallel_size=2, expert_parallel_size=2) == single_rank
