"""Online quantization of a whole model (--quantization) against an independent oracle: the
unquantized engine run on a checkpoint whose weights were replaced, tensor by tensor, by their
quantize-then-dequantize values. Also: what is and is not quantized, the byte counts, bad input.
"""

from __future__ import annotations

import pytest
import torch
from hf_reference import make_hf_model

from ernie_cluster import LLM, SamplingParams
from ernie_cluster.loader.model_loader import load_model
from ernie_cluster.quantization.schemes import dequantize, quantize, scheme_for
from ernie_cluster.quantization.weight import QuantizedWeight

METHODS = ("wint8", "wint4", "fp8", "block_wise_fp8")
# Checkpoint tensors --quantization replaces: attention projections, dense MLP, shared and
# routed experts (transformers holds them stacked, [E, N, K] like ours). Not the router gate,
# the norms, the embedding.
QUANTIZED_SUFFIXES = ("_proj.weight", "experts.gate_up_proj", "experts.down_proj")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40] * 37, [3, 99, 150]]


def is_quantized(name: str) -> bool:
    return name.endswith(QUANTIZED_SUFFIXES) and ".mlp.gate." not in name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(the checkpoint, {method: its fake-quantized twin}) with head_dim 64 and K = 128 / 96,
    so wint4 and block_wise_fp8 groups of 128 meet both whole and partial groups."""
    overrides = dict(hidden_size=128, head_dim=32, moe_intermediate_size=96, intermediate_size=160)
    model = make_hf_model(seed=3, **overrides)
    original = tmp_path_factory.mktemp("original")
    model.save_pretrained(original)
    twins = {}
    for method in METHODS:
        scheme = scheme_for(method)
        twin = make_hf_model(seed=3, **overrides)
        with torch.no_grad():
            for name, param in twin.named_parameters():
                if is_quantized(name):
                    qweight, scale = quantize(param.data, scheme)
                    param.copy_(dequantize(qweight, scale, scheme, torch.float32))
        path = tmp_path_factory.mktemp(method)
        twin.save_pretrained(path)
        twins[method] = path
    return original, twins


def greedy(path, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    with LLM(model=str(path), dtype="float32", show_progress=False, **kwargs) as llm:
        return [o.outputs[0] for o in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("method", METHODS)
def test_quantized_engine_equals_the_unquantized_engine_on_dequantized_weights(method, checkpoints):
    original, twins = checkpoints
    ours = greedy(original, quantization=method)
    oracle = greedy(twins[method])
    for got, want in zip(ours, oracle, strict=True):
        assert got.token_ids == want.token_ids
        for got_step, want_step in zip(got.logprobs, want.logprobs, strict=True):
            assert got_step.keys() == want_step.keys()
            for token, value in want_step.items():
                assert abs(got_step[token] - value) < 1e-4


def test_quantization_changes_the_answer(checkpoints):
    """The oracle comparison above would pass with quantization off too if the weights barely
    moved: wint4 must actually change the logprobs of the unquantized model."""
    original, _ = checkpoints
    plain = greedy(original)
    quantized = greedy(original, quantization="wint4")
    diffs = [
        abs(q.logprobs[0][t] - p.logprobs[0][t])
        for q, p in zip(quantized, plain, strict=True)
        for t in p.logprobs[0].keys() & q.logprobs[0].keys()
    ]
    assert max(diffs) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_projections_are_quantized_and_bytes_shrink(checkpoints, dtype):
    original, _ = checkpoints
    plain = load_model(original, dtype=dtype, show_progress=False)
    quantized = load_model(original, dtype=dtype, show_progress=False, quantization="wint8")
    kept = dict(quantized.named_parameters())
    for name, param in plain.named_parameters():
        if name in kept:
            assert torch.equal(kept[name], param), name  # router, norms, embedding untouched
    replaced = {n for n, m in quantized.named_modules() if isinstance(m, QuantizedWeight)}
    layer0 = {n.removeprefix("layers.0.") for n in replaced if n.startswith("layers.0.")}
    assert layer0 == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
    assert "layers.1.mlp.experts.gate_up_proj" in replaced
    assert "layers.1.mlp.shared_experts.down_proj" in replaced
    assert not any("gate.weight" in n for n in replaced)
    for name in replaced:
        module = quantized.get_submodule(name)
        original_bytes = torch.Size(module.shape).numel() * torch.finfo(dtype).bits // 8
        # int8 values plus one float32 scale per row
        rows = torch.Size(module.shape[:-1]).numel()
        assert module.nbytes() == original_bytes // (torch.finfo(dtype).bits // 8) + rows * 4


def test_unknown_method_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown quantization 'int3'; choose one of"):
        LLM(model=str(tmp_path), quantization="int3")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_quantize_to_what_one_rank_does(method, checkpoints, ray_cluster):
    """TP2/EP2: o_proj is split by columns, so its scales come from both ranks' maxima; the
    greedy tokens and logprobs equal one rank's to float tolerance."""
    original, _ = checkpoints
    one = greedy(original, quantization=method)
    two = greedy(original, quantization=method, tensor_parallel_size=2, expert_parallel_size=2)
    for got, want in zip(two, one, strict=True):
        assert got.token_ids == want.token_ids
        for got_step, want_step in zip(got.logprobs, want.logprobs, strict=True):
            for token, value in want_step.items():
                assert abs(got_step[token] - value) < 1e-4


@pytest.mark.parametrize("method", [None, *METHODS])
def test_planned_bytes_from_shapes_equal_a_quantized_models_bytes(method, checkpoints):
    """The figures bench_quantization computes for the real model's shapes (on the meta
    device) are the bytes a quantized model's weights take."""
    from ernie_cluster.quantization.apply import planned_weight_bytes

    original, _ = checkpoints
    plain = load_model(original, dtype=torch.bfloat16, show_progress=False)
    planned = planned_weight_bytes(plain, method)
    quantized = load_model(original, dtype=torch.bfloat16, show_progress=False, quantization=method)
    actual = {"experts": 0, "other": 0}
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedWeight):
            actual["experts" if ".experts." in f".{name}." else "other"] += module.nbytes()
    for name, param in quantized.named_parameters():
        actual["experts" if ".experts." in f".{name}." else "other"] += param.nbytes
    assert planned == actual
    if method is not None:
        assert sum(planned.values()) < sum(planned_weight_bytes(plain, None).values())


def test_engine_stats_report_the_weight_bytes_each_rank_holds(checkpoints):
    original, _ = checkpoints
    held = {}
    for method in (None, "wint8"):
        with LLM(
            model=str(original), dtype="bfloat16", show_progress=False, quantization=method
        ) as llm:
            held[method] = llm.get_stats().weight_bytes_per_rank
            planned = llm.engine.executor.collective_rpc("resident_parameter_bytes")
            assert held[method] == sum(planned[0].values())
    plain = load_model(original, dtype=torch.bfloat16, show_progress=False)
    assert held[None] == sum(p.nbytes for p in plain.parameters())
    assert held["wint8"] < 0.7 * held[None]
