"""KernelCounter: counts the kernels a block of tensor code would launch on a GPU, on the CPU.

For the kernel budget of the GPU path (benchmarks/bench_step_ops.py --gpu-path and its test).
Two sources: every aten op that does work on the device, seen by a `TorchDispatchMode` (views,
allocations and other metadata-only ops excluded), and every Triton launch, seen by wrapping
the launcher of Triton's CPU interpreter (TRITON_INTERPRET=1). Torch ops the interpreter runs
inside a launch are its own bookkeeping and are not counted. A count, not a time: one aten op
may be more than one CUDA kernel (a sort, a cuBLAS split-K), which the count does not see.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that only allocate or relabel memory: no kernel on a GPU.
_NO_KERNEL = {
    aten.empty,
    aten.empty_like,
    aten.empty_strided,
    aten.new_empty,
    aten.new_empty_strided,
    aten.detach,
    aten.lift_fresh,
    aten._unsafe_view,
    aten._reshape_alias,
    aten.alias,
    aten.set_,
    aten.resize_,
}


def may_alias(func) -> bool:
    """Whether every output of an aten overload may be a view of an input (a view op, or one
    such as `to` and `reshape` that copies only when it must)."""
    returns = func._schema.returns
    return bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )


def launches_kernel(func, args: tuple = (), result: object = None) -> bool:
    """Whether an aten overload did work on the device (not a view, not an allocation). An
    op that may alias counts when its result is new memory (`x.to(other dtype)`)."""
    if func.overloadpacket in _NO_KERNEL:
        return False
    if not may_alias(func):
        return True
    if not isinstance(result, torch.Tensor):
        return False  # split and friends: lists of views
    inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    return result.untyped_storage().data_ptr() not in inputs


def use_gpu_path(model: nn.Module, enabled: bool = True) -> None:
    """Switch `model` (an Ernie4_5_MoeForCausalLM) to the GPU code path whatever its tensors'
    device: Triton attention and every block with a `method` (layers.KERNEL_METHODS,
    fused_moe.METHODS) on its Triton kernel, which on CPU tensors needs TRITON_INTERPRET=1.
    `enabled=False` switches back to the device's default (on CPU, the torch ops)."""
    from ernie_cluster import cpu_bf16
    from ernie_cluster.attention.backend import TorchPagedAttention

    cpu_bf16.set_cpu_paths(not enabled)  # a GPU takes none of the CPU-only paths
    if enabled:
        from ernie_cluster.attention.triton_backend import TritonPagedAttention

        backend = TritonPagedAttention()
    else:
        backend = TorchPagedAttention()
    for module in model.modules():
        if hasattr(module, "method"):
            module.method = "triton" if enabled else "auto"
        if hasattr(module, "backend"):
            module.backend = backend


class KernelCounter(TorchDispatchMode):
    """Use as `with KernelCounter() as counter:`; then read `torch_ops`, `triton_launches`
    (by name) and `total`."""

    def __init__(self) -> None:
        super().__init__()
        self.torch_ops: Counter[str] = Counter()
        self.triton_launches: Counter[str] = Counter()
        self._launching = 0
        self._saved_run = None

    @property
    def total(self) -> int:
        return sum(self.torch_ops.values()) + sum(self.triton_launches.values())

    def by_name(self) -> Counter[str]:
        """Every kernel so far by name: aten op names and Triton kernel names."""
        return self.torch_ops + self.triton_launches

    def __enter__(self) -> KernelCounter:
        from triton.runtime.interpreter import InterpretedFunction

        counter, original = self, InterpretedFunction.run
        self._saved_run = original

        def run(kernel, *args, grid, warmup, **kwargs):
            if not warmup:
                counter.triton_launches[kernel.__name__] += 1
            counter._launching += 1
            try:
                return original(kernel, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                counter._launching -= 1

        InterpretedFunction.run = run
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self._saved_run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not self._launching and launches_kernel(func, args, result):
            self.torch_ops[func.overloadpacket.__name__] += 1
        return result
