"""Both executors implement every member of the `Executor` protocol the engine relies on, with
the protocol's signatures: the engine calls them directly, with no `getattr` fallback."""

from __future__ import annotations

import inspect

import pytest

from ernie_cluster.executor.base import Executor
from ernie_cluster.executor.local_executor import LocalExecutor
from ernie_cluster.executor.ray_executor import RayExecutor, WorkerDiedError

METHODS = sorted(
    name for name, value in vars(Executor).items() if callable(value) and not name.startswith("_")
)


def test_the_protocol_names_what_the_engine_calls():
    # An independent list: every executor member the engine, the async engine and a Serve
    # replica use (a protocol that lost one would no longer state the contract).
    assert METHODS == [
        "check_health",
        "collective_rpc",
        "execute_model",
        "expert_load",
        "shutdown",
        "worker_pids",
    ]
    assert set(Executor.__annotations__) == {"num_kv_blocks", "recovers_from_step_errors"}


@pytest.mark.parametrize("executor_cls", [LocalExecutor, RayExecutor])
@pytest.mark.parametrize("method", METHODS)
def test_executor_methods_match_the_protocol(executor_cls, method):
    implemented = getattr(executor_cls, method, None)
    assert callable(implemented), f"{executor_cls.__name__} lacks {method}"
    expected = inspect.signature(getattr(Executor, method))
    actual = inspect.signature(implemented)
    assert [(p.name, p.kind) for p in actual.parameters.values()] == [
        (p.name, p.kind) for p in expected.parameters.values()
    ]


def test_only_the_in_process_executor_survives_a_failed_step():
    assert LocalExecutor.recovers_from_step_errors is True
    assert RayExecutor.recovers_from_step_errors is False


def test_worker_died_error_is_importable_without_torch_or_ray():
    import subprocess
    import sys

    code = (
        "import sys; from ernie_cluster.executor.base import WorkerDiedError; "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
    assert WorkerDiedError.__module__ == "ernie_cluster.executor.base"
