"""The `Executor` protocol: everything the engine (and a Serve replica) asks of its executor.

An executor owns a model instance's shard workers, in-process (`LocalExecutor`) or as Ray
actors (`RayExecutor`), and runs one engine step on all of them. The engine reaches workers
only through these members, so a test double that implements them can stand in for the model.
Imports neither torch nor Ray, so callers that only catch `WorkerDiedError` stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from ernie_cluster.step_io import ModelRunnerOutput, SchedulerOutput


class WorkerDiedError(RuntimeError):
    """A shard worker died or failed; the executor cannot run steps any more."""


class Executor(Protocol):
    num_kv_blocks: int
    """KV cache blocks every rank holds (the ranks agree on one number at start-up)."""

    recovers_from_step_errors: bool
    """True when a failed `execute_model` leaves the workers consistent: the engine then ends
    that step's requests and keeps serving. False: the error is fatal to the engine."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; returns rank 0's sampled tokens (and logprobs)."""
        ...

    def collective_rpc(self, method: str, *args: Any, timeout: float | None = None) -> list:
        """Call `Worker.<method>(*args)` on every rank; the results in rank order."""
        ...

    def expert_load(self) -> torch.Tensor:
        """[moe_layers, experts] tokens routed to each expert since start, summed over ranks."""
        ...

    def check_health(self) -> None:
        """Raises unless every rank can run steps (may block up to the executor's timeout)."""
        ...

    def worker_pids(self) -> list[int]:
        """The process id running each rank, rank order."""
        ...

    def shutdown(self) -> None:
        """Stop the workers and release their resources; the executor runs no more steps."""
        ...
