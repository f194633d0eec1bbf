"""A CPU stand-in for the torch.cuda graph and stream API, faithful where graphs can go wrong.

`CUDAGraph.capture_begin` starts recording every aten and c10d op (a dispatch mode) with the
tensors it read and wrote; `capture_end` stops; `replay` re-runs the recorded ops on the same
tensors, copying each out-of-place result into the tensor the capture produced. So, as on a
GPU: Python does not run on replay (host ints, branches and list lengths stay as captured),
inputs must be copied into the static buffers, outputs are the captured tensors, and a
collective replays in the recorded order. A host sync or a host tensor made from Python data
during capture raises, as it would break a real capture; an op whose output shape changes on
replay (data-dependent) raises too. Streams, pools and synchronize are no-ops.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._pytree import tree_leaves

from ernie_cluster_tools.diagnostics import SyncRecorder


class _TritonLaunch:
    """A Triton kernel launched in the CPU interpreter during capture: replayed as launched
    (the same grid, the same tensors and host arguments), as a CUDA graph replays a kernel."""

    def __init__(self, run, kernel, args: tuple, kwargs: dict) -> None:
        self.run, self.kernel, self.args, self.kwargs = run, kernel, args, kwargs

    def __call__(self) -> None:
        self.run(self.kernel, *self.args, **self.kwargs)


class _Tape(SyncRecorder):
    def __init__(self) -> None:
        super().__init__()
        self.ops_recorded: list[tuple] = []
        self._launching = 0
        self._saved_run = None

    def __enter__(self) -> _Tape:
        self._patch_triton()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self._saved_run is not None:
            from triton.runtime.interpreter import InterpretedFunction

            InterpretedFunction.run = self._saved_run

    def _patch_triton(self) -> None:
        """Record interpreter launches (TRITON_INTERPRET=1): their work is numpy on the
        tensors' memory, which no dispatch mode sees. Their own torch bookkeeping is not
        recorded."""
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:
            return
        tape, original = self, InterpretedFunction.run
        self._saved_run = original

        def run(kernel, *args, grid, warmup, **kwargs):
            if warmup:
                return original(kernel, *args, grid=grid, warmup=warmup, **kwargs)
            tape._launching += 1
            tape._readout_depth += 1
            try:
                result = original(kernel, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                tape._launching -= 1
                tape._readout_depth -= 1
            launch = _TritonLaunch(
                original, kernel, args, {"grid": grid, "warmup": False, **kwargs}
            )
            tape.ops_recorded.append((launch, (), {}, None))
            return result

        InterpretedFunction.run = run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._launching:
            return func(*args, **(kwargs or {}))
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.ops_recorded.append((func, args, kwargs or {}, out))
        return out


def _rerun(func, args, kwargs, captured) -> None:
    if isinstance(func, _TritonLaunch):
        func()
        return
    fresh = func(*args, **kwargs)
    for new, old in zip(tree_leaves(fresh), tree_leaves(captured), strict=True):
        if isinstance(old, torch.Tensor):
            if new.shape != old.shape:
                raise RuntimeError(
                    f"{func}: shape {tuple(new.shape)} on replay, captured {tuple(old.shape)}"
                )
            if new.numel() and new.data_ptr() != old.data_ptr():
                old.copy_(new)
        elif hasattr(new, "wait"):  # a collective's Work
            new.wait()


class FakeCUDAGraph:
    def __init__(self, *args, **kwargs) -> None:
        self._tape: _Tape | None = None
        self.ops: list[tuple] = []
        self.replays = 0

    def capture_begin(self, pool=None, capture_error_mode: str = "global") -> None:
        self._tape = _Tape()
        self._tape.__enter__()

    def capture_end(self) -> None:
        tape, self._tape = self._tape, None
        tape.__exit__(None, None, None)
        if tape.syncs or tape.readouts:
            raise RuntimeError(f"host sync during capture: {tape.syncs + tape.readouts}")
        if tape.host_tensors:
            raise RuntimeError(f"{tape.host_tensors} host tensors built during capture")
        self.ops = tape.ops_recorded

    def replay(self) -> None:
        with torch.inference_mode():
            for func, args, kwargs, captured in self.ops:
                _rerun(func, args, kwargs, captured)
        self.replays += 1


class _FakeGraphContext:
    def __init__(self, graph: FakeCUDAGraph, pool=None, stream=None, **kwargs) -> None:
        self.graph = graph

    def __enter__(self) -> None:
        self.graph.capture_begin()

    def __exit__(self, *exc) -> None:
        self.graph.capture_end()


class _FakeStream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass


@contextlib.contextmanager
def fake_cuda_graph_api():
    """Patch torch.cuda's graph and stream API for the duration; yields the graphs made."""
    made: list[FakeCUDAGraph] = []

    def new_graph(*args, **kwargs):
        made.append(FakeCUDAGraph())
        return made[-1]

    fakes = {
        "CUDAGraph": new_graph,
        "graph": _FakeGraphContext,
        "graph_pool_handle": lambda: object(),
        "Stream": _FakeStream,
        "stream": lambda stream: contextlib.nullcontext(),
        "current_stream": lambda device=None: _FakeStream(),
        "synchronize": lambda device=None: None,
        "mem_get_info": lambda device=None: (0, 0),
    }
    saved = {name: getattr(torch.cuda, name) for name in fakes}
    try:
        for name, fake in fakes.items():
            setattr(torch.cuda, name, fake)
        yield made
    finally:
        for name, real in saved.items():
            setattr(torch.cuda, name, real)
