"""The sampler never waits on the device: no host sync in `__call__`, one copy in `to_host`.

Runs mixed batches under `SyncRecorder` (a TorchDispatchMode plus wrapped host readers) on
CPU, and on CUDA when present; the first test shows the recorder catches each kind of sync,
so the others can fail.
"""

from __future__ import annotations

import pytest
import torch
from sample_reference import make_state

from ernie_cluster.sample import Sampler
from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster_tools.diagnostics import SyncRecorder

VOCAB = 96
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_recorder_catches_every_kind_of_sync():
    t = torch.randn(4, 8)
    cases = {
        "int(max)": lambda: int(t.max()),
        "nonzero": lambda: torch.nonzero(t > 0),
        "mask index": lambda: t[t > 0],
        "mask assign": lambda: t.clone().__setitem__(t > 0, 0.0),
        "any in if": lambda: bool((t > 0).any()),
        "equal": lambda: torch.equal(t, t),
        "item": lambda: t[0, 0].item(),
    }
    for name, fn in cases.items():
        with SyncRecorder() as rec:
            fn()
        assert rec.syncs, name
    for reader in ("tolist", "numpy", "cpu"):
        with SyncRecorder() as rec:
            getattr(t, reader)()
        assert len(rec.readouts) == 1, reader
    with SyncRecorder() as rec:
        t.tolist()
        t[0].tolist()
    assert len(rec.readouts) == 2
    with SyncRecorder() as rec:
        t[[0, 2]]  # a Python-list index is a host tensor: an upload on a GPU
    assert rec.host_tensors == 1 and not rec.syncs
    assert torch.Tensor.__dict__.get("tolist") is None  # the wrappers are gone afterwards


# Every stage at once: greedy, tiny temperature, plain random, top-k, top-p, both, min-p,
# the three penalties, min_tokens, logprobs on some rows, seeded and unseeded rows.
MIXED = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.3),
    SamplingParams(temperature=1e-40, top_p=0.5),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.8, top_k=5, seed=11),
    SamplingParams(temperature=1.2, top_p=0.7, logprobs=0),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, seed=3, logprobs=5),
    SamplingParams(temperature=1.0, min_p=0.2, frequency_penalty=0.5),
    SamplingParams(temperature=0.7, presence_penalty=-1.0, min_tokens=4, stop_token_ids=[7]),
    SamplingParams(temperature=1.0, top_k=VOCAB + 5, seed=5, min_tokens=2),
]
GREEDY = SamplingParams(temperature=0.0)
# name: (params per row, packed uploads per call)
BATCHES = {
    "mixed": (MIXED, 1),
    "all_random_seeded_logprobs": (
        [SamplingParams(temperature=1.0, top_p=0.9, seed=i, logprobs=2) for i in range(5)],
        1,
    ),
    "all_greedy": ([GREEDY] * 4, 0),
    "greedy_all_logprobs": ([SamplingParams(temperature=0.0, logprobs=20)] * 3, 0),
    # The rows that ask for logprobs are an index, so they travel up.
    "greedy_some_logprobs": ([SamplingParams(temperature=0.0, logprobs=2), GREEDY], 1),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_call_never_syncs_and_to_host_copies_once(batch: str, device: str):
    all_params, num_uploads = BATCHES[batch]
    states = [
        make_state(p, prompt=[1, 2, 3, 50], output=[4, 4, 60][: i % 4], sample_index=i % 2)
        for i, p in enumerate(all_params)
    ]
    for state in states:
        if state.prompt_ids_tensor is not None:
            state.prompt_ids_tensor = state.prompt_ids_tensor.to(device)
        if state.generator is not None:
            seed = state.generator.initial_seed()
            state.generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(len(states), VOCAB, generator=torch.Generator().manual_seed(0))
    logits = logits.to(device)

    sampler = Sampler()
    sampler(logits, states)  # warm-up: lazy initialisation may read the device once
    with SyncRecorder() as rec:
        out = sampler(logits, states)
    assert rec.syncs == []
    assert rec.readouts == []
    # All per-row inputs ride one packed upload: one host tensor, none for plain greedy.
    assert rec.host_tensors == num_uploads
    if device == "cuda":
        assert rec.uploads == num_uploads

    with SyncRecorder() as rec:
        token_ids, logprobs = out.to_host()
    assert rec.syncs == []
    assert len(rec.readouts) == 1, rec.readouts
    assert rec.uploads == 0
    assert token_ids == out.token_ids.tolist()
    asked = [s.params.logprobs is not None for s in states]
    assert [entry is not None for entry in logprobs] == asked
