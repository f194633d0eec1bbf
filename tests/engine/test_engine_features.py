"""Engine behaviour on the tiny checkpoint: prefix caching, seeded sampling, n > 1, logprobs,
stop strings, min_tokens, aborts and block accounting."""

from __future__ import annotations

import random

import pytest
import torch
from engine_helpers import assert_no_leaks

from ernie_cluster import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    with LLM(model=str(tiny_checkpoint), dtype="float32", show_progress=False) as instance:
        yield instance


def rand_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(13, 512) for _ in range(n)]


def test_prefix_cache_computes_only_new_tokens(llm, tiny_checkpoint):
    prefix = rand_ids(200, 1)
    first, second = prefix + rand_ids(9, 2), prefix + rand_ids(23, 3)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.generate([first], greedy)
    before = llm.get_stats()
    out = llm.generate([second], greedy)[0]
    after = llm.get_stats()
    cached = (200 // 16) * 16  # whole blocks of the shared prefix
    assert out.num_cached_tokens == cached
    assert (
        after.num_prompt_tokens_computed - before.num_prompt_tokens_computed == len(second) - cached
    )
    assert after.prefix_cache_hits - before.prefix_cache_hits == cached
    with LLM(
        model=str(tiny_checkpoint),
        dtype="float32",
        show_progress=False,
        enable_prefix_caching=False,
    ) as fresh:
        assert fresh.generate([second], greedy)[0].outputs[0].token_ids == out.outputs[0].token_ids
    assert_no_leaks(llm.engine)


def test_seeded_sampling_independent_of_batch(llm):
    prompt = rand_ids(40, 4)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([prompt], params)[0].outputs[0].token_ids
    others = [rand_ids(n, 10 + n) for n in (5, 77, 130)]
    noisy = SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)
    batch = llm.generate([others[0], prompt, others[1], others[2]], [noisy, params, noisy, noisy])
    assert batch[1].outputs[0].token_ids == alone
    unseeded = llm.generate(
        [prompt], SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    )[0]
    assert unseeded.outputs[0].token_ids != alone  # the seed, not luck, fixed the tokens


def test_n_samples_differ_and_share_the_prompt(llm):
    prompt = rand_ids(100, 5)
    out = llm.generate(
        [prompt], SamplingParams(n=4, temperature=1.0, max_tokens=16, ignore_eos=True, seed=7)
    )[0]
    samples = [tuple(o.token_ids) for o in out.outputs]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len(set(samples)) == 4
    assert llm.get_stats().prefix_cache_hits >= 3 * (100 // 16) * 16
    assert_no_leaks(llm.engine)


def test_logprobs_are_log_softmax_of_the_logits(llm, tiny_checkpoint):
    from transformers import Ernie4_5_MoeForCausalLM

    hf = Ernie4_5_MoeForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    prompt = rand_ids(30, 6)
    out = llm.generate(
        [prompt], SamplingParams(temperature=1.0, seed=3, max_tokens=6, logprobs=4, ignore_eos=True)
    )[0].outputs[0]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + out.token_ids])).logits[0]
    reference = torch.log_softmax(logits.float(), -1)
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = reference[len(prompt) - 1 + step]
        assert token in entry
        top = set(torch.topk(row, 4).indices.tolist())
        assert top <= set(entry)
        for token_id, value in entry.items():
            assert value == pytest.approx(row[token_id].item(), abs=1e-4)


SEEDED = dict(temperature=1.0, seed=11, max_tokens=40, ignore_eos=True)


def _boundary_stop(llm, prompt):
    """A stop string made of the last char of one token and the first of the next."""
    out = llm.generate([prompt], SamplingParams(**SEEDED))[0].outputs[0]
    tok = llm.tokenizer
    for i in range(4, len(out.token_ids) - 1):
        left = tok.decode(out.token_ids[:i])
        piece, nxt = tok.decode(out.token_ids[i - 1 : i]), tok.decode(out.token_ids[i : i + 1])
        full = tok.decode(out.token_ids[: i + 1])
        visible = (piece + nxt).isprintable() and "\ufffd" not in piece + nxt
        if visible and piece.strip() and nxt.strip() and full.startswith(left):
            stop = left[-1] + full[len(left)]
            if stop not in left[:-1]:
                return out, stop, left[:-1]
    pytest.fail("no token boundary with visible text on both sides")


def test_stop_string_spanning_tokens(llm):
    prompt = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    _greedy, stop, expected_text = _boundary_stop(llm, prompt)
    out = llm.generate([prompt], SamplingParams(**SEEDED, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == expected_text
    assert stop not in out.text
    kept = llm.generate(
        [prompt], SamplingParams(**SEEDED, stop=[stop], include_stop_str_in_output=True)
    )
    assert kept[0].outputs[0].text == expected_text + stop


def test_min_tokens_masks_stop_tokens(llm):
    prompt = rand_ids(20, 8)
    greedy = (
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
        .outputs[0]
        .token_ids
    )
    stopper = greedy[1]
    short = llm.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[stopper]),
    )[0].outputs[0]
    assert short.token_ids[-1] == stopper and short.finish_reason == "stop"
    assert short.stop_reason == stopper
    assert short.text == llm.tokenizer.decode(short.token_ids[:-1])  # stop token text left out
    held = llm.generate(
        [prompt],
        SamplingParams(
            temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[stopper], min_tokens=6
        ),
    )[0].outputs[0]
    assert len(held.token_ids) >= 6 and stopper not in held.token_ids[:6]


def test_aborts_free_blocks_and_others_continue(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i in range(6):
        engine.add_request(f"abort-{i}", rand_ids(50 + 20 * i, 20 + i), params)
    for _ in range(3):
        engine.step()
    engine.abort_request([f"abort-{i}" for i in range(0, 6, 2)])
    finished = set()
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == {"abort-1", "abort-3", "abort-5"}
    assert_no_leaks(engine)


def test_request_that_can_never_fit_is_rejected(tiny_checkpoint):
    with LLM(
        model=str(tiny_checkpoint), dtype="float32", show_progress=False, num_kv_blocks=8
    ) as small:
        with pytest.raises(ValueError, match=r"needs 10 KV blocks .* holds only 8"):
            small.generate([rand_ids(100, 9)], SamplingParams(max_tokens=60))
        assert_no_leaks(small.engine)
