"""The pieces of speculative decoding on their own: which rows a verification keeps, the
ngram and suffix proposers, the settings, and the scheduler giving back rejected slots
without ever publishing a rejected token in the prefix cache."""

from __future__ import annotations

import argparse

import pytest

from ernie_cluster.cli.model_args import add_model_args, model_values
from ernie_cluster.config.engine_config import EngineSettings
from ernie_cluster.config.speculative_config import SpeculativeConfig
from ernie_cluster.engine.kv_cache import KVCacheManager
from ernie_cluster.engine.request import Request, RequestStatus
from ernie_cluster.engine.scheduler import Scheduler, SchedulerConfig
from ernie_cluster.engine.speculative.ngram import NgramProposer
from ernie_cluster.engine.speculative.proposer import SpeculativeProposer
from ernie_cluster.engine.speculative.suffix import SuffixProposer
from ernie_cluster.engine.speculative.token_index import TokenIndex
from ernie_cluster.sample.speculative import accepted_rows
from ernie_cluster.sampling_params import SamplingParams


def test_accepted_rows_keep_the_agreeing_prefix_and_the_next_sample():
    ids = ["a", "b", "b", "b", "c", "d", "d"]
    tokens = [5, 7, 8, 9, 1, 4, 4]
    drafts = {"b": [7, 0], "d": [4]}
    # a: plain (row 0); b: 7 accepted, 0 rejected -> rows 1, 2; c: row 4; d: 4 accepted and
    # the bonus row 6.
    assert accepted_rows(ids, tokens, drafts) == [0, 1, 2, 4, 5, 6]
    assert accepted_rows(["x", "x", "x"], [3, 3, 3], {"x": [9, 9]}) == [0]


def test_token_index_finds_recent_longest_matches_and_forgets():
    index = TokenIndex(anchor=2)
    index.extend("s", [1, 2, 3, 9, 2, 3, 4, 1, 2, 3])
    found = index.matches([5, 1, 2, 3], max_length=8, skip=("s", 9))
    assert [(m.end, m.length) for m in found] == [(5, 2), (2, 3)]
    index.remove("s")
    assert index.matches([1, 2, 3], 8) == [] and len(index) == 0


def test_ngram_proposes_what_followed_the_longest_earlier_match():
    ngram = NgramProposer(lookup_min=2, lookup_max=4)
    # "7 8" occurred twice; "6 7 8" only once (followed by 1 2 3): the longer match wins.
    ngram.extend("r", [6, 7, 8, 1, 2, 3, 0, 7, 8, 5, 5, 4, 6, 7, 8])
    assert ngram.propose("r", 3) == [1, 2, 3]
    assert ngram.propose("r", 10) == [1, 2, 3, 0, 7, 8, 5, 5, 4, 6]
    ngram.extend("q", [1, 2, 3, 4])
    assert ngram.propose("q", 3) == []  # "3 4" never occurred before


def test_suffix_learns_from_finished_requests_and_stops_at_rare_tokens():
    suffix = SuffixProposer(max_depth=8, max_cached_requests=2, spec_factor=4.0, min_token_prob=0.6)
    call = [40, 41, 42, 43, 44, 45]
    for i, tail in enumerate([50, 50, 51]):
        suffix.extend(f"old{i}", [1, 2, *call])  # prompt of 2, then part of the output
        suffix.finish(f"old{i}", [*call, tail])  # the whole output joins the cache
    # Only the last two finished requests stay cached (max_cached_requests=2).
    suffix.extend("new", [9, 9, 40, 41])
    # After "40 41" both cached outputs go on 42..45; then one says 50, one 51: a 50% share
    # is under min_token_prob, so the proposal stops before it.
    assert suffix.propose("new", 8) == [42, 43, 44, 45]
    # spec_factor x matched length (2 tokens x 4) caps it too.
    assert suffix.propose("new", 3) == [42, 43, 44]


def test_settings_parse_from_the_flag_and_refuse_bad_values():
    parser = argparse.ArgumentParser()
    add_model_args(parser, EngineSettings, "engine")
    args = parser.parse_args(
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']
    )
    settings = EngineSettings(**model_values(args, EngineSettings))
    assert settings.speculative_config == SpeculativeConfig(
        method="ngram", num_speculative_tokens=3
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative-config", "ngram"])
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculativeConfig(
            method="ngram", num_speculative_tokens=2, prompt_lookup_min=4, prompt_lookup_max=2
        )
    with pytest.raises(ValueError, match="method"):
        EngineSettings(speculative_config={"method": "eagle", "num_speculative_tokens": 2})


def _request(req_id: str, prompt: list[int], **params) -> Request:
    sampling = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, **params)
    return Request(req_id, prompt, sampling, frozenset(), max_tokens=64, parent_id=req_id)


def test_proposals_skip_what_verification_cannot_keep_exact():
    proposer = SpeculativeProposer(
        SpeculativeConfig(method="ngram", num_speculative_tokens=4, min_acceptance=0.0),
        max_model_len=64,
    )
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    plain = _request("plain", prompt)
    penalised = _request("penalised", prompt, repetition_penalty=1.2)
    early = _request("early", prompt, min_tokens=5)
    fresh = _request("fresh", prompt)
    for request in (plain, penalised, early):
        request.output_token_ids = [3]
        request.num_computed_tokens = request.num_tokens - 1
    fresh.num_computed_tokens = fresh.num_tokens - 1  # no output yet: the prompt's last token
    requests = [plain, penalised, early, fresh]
    proposer.propose(requests, [r.request_id for r in requests])
    assert plain.spec_token_ids == [4, 1, 2, 3]
    assert penalised.spec_token_ids == early.spec_token_ids == fresh.spec_token_ids == []
    plain.output_token_ids += [4] * 57  # 2 tokens left to max_tokens: room for 1 proposal
    plain.num_computed_tokens = plain.num_tokens - 1
    proposer.propose([plain], ["plain"])
    assert len(plain.spec_token_ids) <= 1


def test_scheduler_takes_back_rejected_slots_and_caches_only_accepted_tokens():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=80), kv)
    request = _request("r", [10, 11, 12, 13, 14, 15])
    scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.update_from_output(out, {"r": [20]})  # 7 tokens, 6 computed
    assert len(kv.get_block_ids("r")) == 2
    request.spec_token_ids = [21, 22, 23, 24, 25, 26]
    out = scheduler.schedule()
    assert out.spec_token_ids == {"r": [21, 22, 23, 24, 25, 26]}
    assert out.num_scheduled_tokens == {"r": 7}  # the last token + 6 proposals
    assert len(kv.get_block_ids("r")) == 4  # slots for 13 tokens
    # The target agreed with 21 only, then sampled 30: 9 tokens, 8 with KV.
    scheduler.update_from_output(out, {"r": [21, 30]})
    assert request.output_token_ids == [20, 21, 30]
    assert request.num_computed_tokens == 8
    assert len(kv.get_block_ids("r")) == 3  # 9 tokens need 3 blocks; the 4th went back
    assert scheduler.stats.spec.num_draft_tokens == 6
    assert scheduler.stats.spec.num_accepted_tokens == 1
    # The published blocks hold accepted tokens only: a new prompt equal to the accepted
    # sequence hits both full blocks; one continuing with a rejected proposal hits one.
    tokens = request.all_token_ids
    assert kv.get_computed_blocks("probe", [*tokens[:8], 0])[1] == 8
    kv.free("probe")
    assert kv.get_computed_blocks("probe", [*tokens[:6], 22, 23, 0])[1] == 4
    kv.free("probe")
    # The workers learn the cut on the request's next step.
    request.spec_token_ids = []
    out = scheduler.schedule()
    (cached,) = out.cached_requests
    assert cached.num_kept_blocks == 3 and cached.new_block_ids == []
    scheduler.finish_requests(["r"], RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == kv.num_blocks


def test_a_stop_token_among_accepted_proposals_ends_the_sequence_there():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=64), kv)
    request = Request(
        "r", [10, 11, 12], SamplingParams(max_tokens=10), frozenset({2}), 10, parent_id="r"
    )
    scheduler.add_request(request)
    scheduler.update_from_output(scheduler.schedule(), {"r": [20]})
    request.spec_token_ids = [21, 2, 23]
    out = scheduler.schedule()
    appended = scheduler.update_from_output(out, {"r": [21, 2, 23, 24]})
    assert appended == [(request, [21, 2])]
    assert request.output_token_ids == [20, 21, 2]
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert kv.num_free_blocks == kv.num_blocks


def test_a_sequence_proposes_as_far_as_its_acceptance_pays():
    proposer = SpeculativeProposer(
        SpeculativeConfig(method="ngram", num_speculative_tokens=4), max_model_len=4096
    )
    request = _request("r", [5, 6, 7, 8] * 8)
    request.max_tokens = 1000

    def step(accepted: int | None) -> int:
        if request.spec_token_ids and accepted is not None:
            request.last_verified = (len(request.spec_token_ids), accepted)
        request.output_token_ids.append(5 + request.num_tokens % 4)  # the cycle goes on
        request.num_computed_tokens = request.num_tokens - 1
        proposer.propose([request], ["r"])
        return len(request.spec_token_ids)

    # Starts cautious (rate 0.5: one token), grows while proposals are accepted...
    counts = [step(None)]
    for _ in range(4):
        counts.append(step(counts[-1]))
    assert counts[0] == 1 and counts[-1] == 4
    # ...and stops after rejections, probing one token every 16 steps.
    counts = [step(0) for _ in range(40)]
    assert counts[:4].count(0) >= 1 and counts[-1] <= 1
    assert sum(counts[8:]) <= 3


def test_proposals_take_only_what_the_step_left_over():
    # 5 blocks of 4 tokens: after both prefills one block is free, and B's next decode needs
    # it. A's decode needs no new block, its proposals would: they must not take B's block.
    kv = KVCacheManager(num_blocks=5, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=64), kv)
    a = Request("a", [3, 4, 5, 6, 7, 8], SamplingParams(max_tokens=8), frozenset(), 8, "a")
    b = Request(
        "b", [9, 10, 11, 12, 13, 14, 15, 16], SamplingParams(max_tokens=8), frozenset(), 8, "b"
    )
    scheduler.add_request(a)
    scheduler.add_request(b)
    scheduler.update_from_output(scheduler.schedule(), {"a": [20], "b": [21]})
    assert kv.num_free_blocks == 1
    a.spec_token_ids = [22, 23, 24, 25]
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}
    assert out.spec_token_ids == {} and scheduler.stats.num_preemptions == 0
    scheduler.update_from_output(out, {"a": [22], "b": [26]})
    # With blocks to spare, the proposals go out, their new block sent to the workers.
    scheduler.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    a.spec_token_ids = [23, 24, 25, 26]
    out = scheduler.schedule()
    assert out.spec_token_ids == {"a": [23, 24, 25, 26]}
    assert out.num_scheduled_tokens == {"a": 5}
    (cached,) = out.cached_requests
    assert cached.new_block_ids == kv.get_block_ids("a")[2:]


def test_draft_model_settings_parse_from_the_flag():
    parser = argparse.ArgumentParser()
    add_model_args(parser, EngineSettings, "engine")
    flag = (
        '{"method": "draft_model", "model": "/ckpt/draft", "num_speculative_tokens": 3, '
        '"draft_tensor_parallel_size": 1}'
    )
    args = parser.parse_args(["--speculative-config", flag])
    spec = EngineSettings(**model_values(args, EngineSettings)).speculative_config
    assert (spec.method, spec.model, spec.num_lookahead_tokens) == ("draft_model", "/ckpt/draft", 3)
    assert SpeculativeConfig(method="suffix", num_speculative_tokens=3).num_lookahead_tokens == 0


def test_lookahead_slots_for_the_draft_come_from_free_blocks_and_go_back():
    # Blocks of 4. A (6 prompt tokens) prefills and samples: 7 tokens after the step, the
    # draft writes positions 6..8 (3 lookahead slots past its 6 computed): 3 blocks. B's
    # prompt chunk stops short of its end: it samples nothing, gets no lookahead.
    kv = KVCacheManager(num_blocks=32, block_size=4)
    config = SchedulerConfig(max_num_batched_tokens=10, max_model_len=64, num_lookahead_tokens=3)
    scheduler = Scheduler(config, kv)
    a = _request("a", [3, 4, 5, 6, 7, 8])
    b = _request("b", [9] * 12)
    scheduler.add_request(a)
    scheduler.add_request(b)
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 6, "b": 4}
    assert out.num_lookahead_tokens == {"a": 3}
    new_a = next(n for n in out.new_requests if n.req_id == "a")
    assert new_a.block_ids == kv.get_block_ids("a") and len(new_a.block_ids) == 3
    # Once the step's token is in, the lookahead block goes back (A needs 2 for 7 tokens).
    scheduler.update_from_output(out, {"a": [20]})
    assert len(kv.get_block_ids("a")) == 2
    # A's own count wins over the default (B, finishing its prompt now, gets that).
    a.num_lookahead_tokens = 1
    out = scheduler.schedule()
    assert out.num_lookahead_tokens == {"a": 1, "b": 3}
    (cached_a,) = [c for c in out.cached_requests if c.req_id == "a"]
    assert cached_a.num_kept_blocks == 2
    scheduler.update_from_output(out, {"a": [21], "b": [22]})
    scheduler.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    # No slot past max_model_len: A has one left, its next decode's.
    scheduler.config.max_model_len = a.num_tokens
    a.num_lookahead_tokens = None
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 1} and out.num_lookahead_tokens == {}
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == kv.num_blocks


def test_lookahead_never_takes_a_block_another_request_needs():
    # 5 blocks of 4: after both prefills one block is free and B's next decode needs it.
    kv = KVCacheManager(num_blocks=5, block_size=4)
    config = SchedulerConfig(max_num_batched_tokens=64, max_model_len=64, num_lookahead_tokens=4)
    scheduler = Scheduler(config, kv)
    a = Request("a", [3, 4, 5, 6, 7, 8], SamplingParams(max_tokens=8), frozenset(), 8, "a")
    b = Request("b", [9] * 8, SamplingParams(max_tokens=8), frozenset(), 8, "b")
    for request in (a, b):
        request.num_lookahead_tokens = 0
        scheduler.add_request(request)
    scheduler.update_from_output(scheduler.schedule(), {"a": [20], "b": [21]})
    a.num_lookahead_tokens = 4  # 7 computed + 4: a third block, the only free one
    out = scheduler.schedule()
    assert out.num_lookahead_tokens == {} and scheduler.stats.num_preemptions == 0


def test_the_draft_makes_as_many_proposals_as_the_next_step_could_take():
    proposer = SpeculativeProposer(
        SpeculativeConfig(method="draft_model", model="/draft", num_speculative_tokens=4),
        max_model_len=4096,
    )
    plain = _request("plain", [5, 6, 7, 8])
    penalised = _request("penalised", [5, 6, 7, 8], presence_penalty=0.5)
    early = _request("early", [5, 6, 7, 8], min_tokens=10)
    for request in (plain, penalised, early):
        request.output_token_ids = [9]
        request.num_computed_tokens = request.num_tokens - 1
    requests = [plain, penalised, early]
    proposer.take_draft_tokens({"plain": [1, 2, 3, 4], "penalised": [1], "early": [1]})
    proposer.propose(requests, [r.request_id for r in requests])
    # Rate 0.5 pays for one proposal now; after a fully accepted step (0.65) for two.
    assert plain.spec_token_ids == [1]
    assert (plain.num_lookahead_tokens, penalised.num_lookahead_tokens) == (2, 0)
    assert early.spec_token_ids == [] and early.num_lookahead_tokens == 0
    # Proposals are the last step's only: a step that brought none leaves none.
    plain.last_verified = (1, 1)
    plain.output_token_ids += [1, 7]
    plain.num_computed_tokens = plain.num_tokens - 1
    proposer.take_draft_tokens({})
    proposer.propose([plain], ["plain"])
    assert plain.spec_token_ids == [] and plain.num_lookahead_tokens == 4
