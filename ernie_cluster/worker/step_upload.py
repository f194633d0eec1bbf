"""StepUpload: a worker step's host-decided inputs, copied to the device in one go.

The input batch (token ids, positions, slots, block-table edits) and the sampler's stages,
which run inside the worker (row indices, token ids, k: ints; temperatures, probabilities,
penalties: floats), register host values and get a `Slot` back; `send` packs them into one
int64 buffer (floats ride as float64 bit patterns), copies it once (pinned and non-blocking on
CUDA) and serves device views per slot. Never reads a device tensor back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# NOTE: the floats are converted once on the device to float32, the dtype the sampler's
# parameters always had; consumers cast further only if their logits differ.
_FLOAT_DTYPE = torch.float32


@dataclass(frozen=True)
class Slot:
    """Where one registered array lies in the packed buffer."""

    offset: int
    size: int
    is_float: bool


class StepUpload:
    def __init__(self) -> None:
        self._ints: list[Sequence[int] | np.ndarray] = []
        self._floats: list[Sequence[float] | np.ndarray] = []
        self._num_ints = 0
        self._num_floats = 0
        self._device_ints: torch.Tensor | None = None
        self._device_floats: torch.Tensor | None = None

    def ints(self, values: Sequence[int] | np.ndarray) -> Slot:
        """Register int64 values; their device tensor is `self[slot]` after `send`."""
        slot = Slot(self._num_ints, len(values), is_float=False)
        self._ints.append(values)
        self._num_ints += slot.size
        return slot

    def floats(self, values: Sequence[float] | np.ndarray) -> Slot:
        """Register float values; `self[slot]` is float32 on the device after `send`."""
        slot = Slot(self._num_floats, len(values), is_float=True)
        self._floats.append(values)
        self._num_floats += slot.size
        return slot

    @property
    def is_empty(self) -> bool:
        return self._num_ints + self._num_floats == 0

    def send(self, device: torch.device) -> None:
        """Copy everything registered to `device` in one transfer; nothing when empty."""
        if self.is_empty:
            return
        num_ints, num_floats = self._num_ints, self._num_floats
        packed = np.empty(num_ints + num_floats, dtype=np.int64)
        if self._ints:
            # NOTE: "unsafe" only lets an empty list (float64 to numpy) into the int64 buffer.
            np.concatenate(self._ints, out=packed[:num_ints], casting="unsafe")
        if self._floats:
            np.concatenate(self._floats, out=packed[num_ints:].view(np.float64))
        host = torch.from_numpy(packed)
        is_cuda = device.type == "cuda"
        if is_cuda:
            # NOTE: pinned, so the copy below neither stages nor waits for the stream; torch's
            # caching host allocator keeps the block until that copy has run.
            host = host.pin_memory()
        on_device = host.to(device, non_blocking=is_cuda)  # [num_ints + num_floats]
        self._device_ints = on_device[:num_ints]
        if num_floats:
            self._device_floats = on_device[num_ints:].view(torch.float64).to(_FLOAT_DTYPE)

    def __getitem__(self, slot: Slot) -> torch.Tensor:
        """[slot.size] device view of a registered array (int64, or float32 for floats)."""
        source = self._device_floats if slot.is_float else self._device_ints
        if source is None:
            raise RuntimeError("StepUpload.send must run before its slots are read")
        return source[slot.offset : slot.offset + slot.size]
