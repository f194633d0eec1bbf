"""Tests of `StepUpload`: one packed copy, exact ints and floats, nothing sent when empty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ernie_cluster.worker.step_upload import StepUpload


def test_slots_round_trip_ints_and_floats():
    upload = StepUpload()
    rows = upload.ints([3, 0, 2])
    big = upload.ints(np.array([2**62 + 1, -5], dtype=np.int64))
    empty = upload.ints([])
    temperature = upload.floats([0.7, 1.0])
    top_p = upload.floats(np.array([0.95]))
    upload.send(torch.device("cpu"))
    assert upload[rows].tolist() == [3, 0, 2] and upload[rows].dtype == torch.int64
    assert upload[big].tolist() == [2**62 + 1, -5]
    assert upload[empty].numel() == 0
    assert upload[temperature].dtype == torch.float32
    assert upload[temperature].tolist() == torch.tensor([0.7, 1.0]).tolist()
    assert upload[top_p].tolist() == torch.tensor([0.95]).tolist()


def test_empty_upload_sends_nothing_and_slots_need_a_send():
    upload = StepUpload()
    assert upload.is_empty
    upload.send(torch.device("cpu"))
    pending = StepUpload()
    slot = pending.ints([1])
    with pytest.raises(RuntimeError, match="send"):
        pending[slot]
