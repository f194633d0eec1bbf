"""SyncRecorder: records what a block of tensor code does that would stall a GPU stream.

For tests and benchmarks that prove a step free of host syncs (and count its ops, the
kernel launches of a GPU). A `TorchDispatchMode` sees every aten op; on top, `Tensor.tolist/numpy/cpu/item` are wrapped,
because on CPU tensors `tolist` and `numpy` never reach the dispatcher. Works on CPU, where
it still catches every host read of tensor data and every host tensor made from Python
data (`aten.lift_fresh`, which becomes a host->device copy on a GPU); on CUDA it also counts
the real copies in each direction.
"""

from __future__ import annotations

import functools
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that read a device value on the host, or whose output size depends on tensor data.
_SYNC_OPS = {
    aten._local_scalar_dense,
    aten.item,
    aten.is_nonzero,
    aten.equal,
    aten.nonzero,
    aten.masked_select,
    aten.unique_consecutive,
    aten._unique2,
}
# Advanced indexing with a boolean mask runs nonzero inside the kernel.
_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_READOUT_METHODS = ("tolist", "numpy", "cpu", "item")


def _is_cpu(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cpu"


class SyncRecorder(TorchDispatchMode):
    """Use as `with SyncRecorder() as rec:`; then read `syncs`, `readouts`, `host_tensors`,
    `uploads` (real host->device copies, CUDA only)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        """Sync ops and boolean-mask indexing, by name."""
        self.readouts: list[str] = []
        """Device->host reads of tensor data (a `.tolist()` counts once, not its inner copy)."""
        self.host_tensors = 0
        """Tensors built from Python data (`torch.tensor(list)`, `t[list]`, `t[m] = 0.0`)."""
        self.uploads = 0
        self.ops: Counter[str] = Counter()
        """Every aten (and c10d) op by schema name, e.g. "aten::mm"."""
        self._readout_depth = 0
        self._saved: dict[str, object] = {}

    def __enter__(self) -> SyncRecorder:
        for name in _READOUT_METHODS:
            self._saved[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for name, saved in self._saved.items():
            if saved is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved)

    def _wrap(self, name: str, method):
        @functools.wraps(method)
        def wrapper(tensor, *args, **kwargs):
            if self._readout_depth == 0:
                self.readouts.append(name)
            self._readout_depth += 1
            try:
                return method(tensor, *args, **kwargs)
            finally:
                self._readout_depth -= 1

        return wrapper

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[func._schema.name] += 1
        packet = func.overloadpacket
        if packet in _SYNC_OPS:
            self.syncs.append(str(func))
            if packet is aten._local_scalar_dense and self._readout_depth == 0:
                self.readouts.append(str(func))
        elif packet in _INDEX_OPS and _has_mask_index(args):
            self.syncs.append(f"{func} with a boolean mask")
        elif packet is aten.lift_fresh:
            self.host_tensors += 1
        out = func(*args, **kwargs)
        if packet in (aten._to_copy, aten.copy_):
            src, dst = (args[0], out) if packet is aten._to_copy else (args[1], args[0])
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                if _is_cpu(dst) and not _is_cpu(src) and self._readout_depth == 0:
                    self.readouts.append(str(func))
                elif _is_cpu(src) and not _is_cpu(dst):
                    self.uploads += 1
        return out


def _has_mask_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()
    )


def use_sync_free_experts(model: torch.nn.Module) -> None:
    """Point every routed-experts module of `model` at the sync-free torch path (grouped_mm,
    what CUDA runs where Triton is missing). On a CPU the default is the per-expert loop, which
    reads the routing counts on the host (free there); a test that proves the GPU step's rules
    on CPU tensors has to run the GPU's path."""
    from ernie_cluster.model.moe import Ernie4_5_MoeExperts

    for module in model.modules():
        if isinstance(module, Ernie4_5_MoeExperts):
            module.method = "grouped_mm"
