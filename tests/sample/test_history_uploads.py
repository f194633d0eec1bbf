"""The hidden host->device copies of sampling are gone: a penalised request's prompt goes up
once through a (pinned) StepUpload, not `torch.tensor(list, device=...)`; its outputs are
appended on the device from the sampled tokens, so no step re-uploads the history (the step's
upload stays the same size however long the history); the grammar mask hands xgrammar no
index list to copy. Penalised logits match the pure-Python reference either way."""

from __future__ import annotations

import pytest
import torch
from sample_reference import penalised_row

from ernie_cluster.sample.penalties import Penalties
from ernie_cluster.sample.sampling_state import SamplingState, record_sampled
from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.worker.step_upload import StepUpload
from ernie_cluster_tools.diagnostics import SyncRecorder

VOCAB = 64
PENALISED = [
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.0, frequency_penalty=0.4, presence_penalty=0.2),
    SamplingParams(temperature=0.0),
]


def test_prompt_goes_up_through_one_step_upload(monkeypatch):
    """One packed buffer (torch.from_numpy, pinned on CUDA), not a tensor built from the list."""
    sent = []
    real_send = StepUpload.send

    def send(self, device):
        sent.append(self._num_ints)
        return real_send(self, device)

    monkeypatch.setattr(StepUpload, "send", send)
    with SyncRecorder() as recorder:
        state = SamplingState.create(PENALISED[0], [5, 9, 5, 2], [0])
    assert sent == [4]
    assert recorder.host_tensors == 1 and recorder.syncs == []  # the packed buffer itself
    assert state.prompt_ids_tensor.tolist() == [5, 9, 5, 2]


def _step_logits(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(len(PENALISED), VOCAB, generator=gen) * 3  # [B, V]


def test_output_history_stays_on_the_device_and_matches_the_reference():
    states = [SamplingState.create(p, [3, 4, 3], [0]) for p in PENALISED]
    sizes = []
    for step in range(12):
        logits = _step_logits(step)
        upload = StepUpload()
        plan = Penalties.plan(states, VOCAB, logits.device, upload)
        upload.send(logits.device)
        if step:  # outputs exist: read on the device, none uploaded
            assert plan.output_ids is None and len(plan.outputs_on_device) == 2
        sizes.append(upload._num_ints)
        edited = logits.clone()
        plan.apply(edited, upload)
        for row, state in enumerate(states[:2]):
            expected = penalised_row(logits[row].tolist(), state)
            torch.testing.assert_close(edited[row], torch.tensor(expected), rtol=1e-5, atol=1e-5)
        tokens = edited.argmax(-1)
        # repeat earlier tokens too, so counts above 1 are exercised
        tokens[1] = 7 if step % 2 else tokens[1]
        record_sampled(states, tokens, tokens.tolist())
    assert len(set(sizes)) == 1, sizes  # the upload does not grow with the history
    assert states[2].output_ids_buffer is None  # no penalties: nothing kept on the device
    kept = states[1].output_ids_on(torch.device("cpu"))
    assert kept.tolist() == states[1].output_token_ids


def test_history_appended_elsewhere_falls_back_to_the_upload():
    state = SamplingState.create(PENALISED[1], [3], [0])
    record_sampled([state], torch.tensor([5]), [5])
    state.output_token_ids.append(6)  # not through record_sampled: the device copy is stale
    upload = StepUpload()
    plan = Penalties.plan([state], VOCAB, torch.device("cpu"), upload)
    assert plan.output_ids is not None and plan.outputs_on_device == ()


def test_grammar_mask_passes_no_index_list(monkeypatch):
    import xgrammar

    from ernie_cluster.sample import grammar_mask
    from ernie_cluster.step_io import GrammarBitmask

    calls = []
    real = xgrammar.apply_token_bitmask_inplace

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(grammar_mask.xgrammar, "apply_token_bitmask_inplace", spy)
    logits = torch.randn(3, VOCAB)
    words = VOCAB // 32
    bitmask = torch.zeros(1, words, dtype=torch.int32)
    bitmask[0, 0] = 0b1010  # only tokens 1 and 3 allowed
    expected = logits.clone()
    expected[1, [t for t in range(VOCAB) if t not in (1, 3)]] = float("-inf")
    grammar_mask.apply_grammar_bitmask(logits, GrammarBitmask(["b"], bitmask), ["a", "b", "c"])
    assert calls and all(call.get("indices") is None for call in calls)
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("length", [0, 1])
def test_short_prompts(length):
    state = SamplingState.create(PENALISED[0], list(range(3, 3 + length)), [0])
    assert state.prompt_ids_tensor.tolist() == list(range(3, 3 + length))
