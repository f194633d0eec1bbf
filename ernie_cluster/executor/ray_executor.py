"""RayExecutor: one Ray actor per shard, in one placement group, in lock-step.

Ray places, starts and stops the shard workers; the per-step traffic goes over a socket step
channel (see step_channel.py; measured against plain Ray actor calls by the control-overhead
part of benchmarks/bench_distributed.py). Each step the SchedulerOutput is pickled once and
sent to every rank; rank 0 replies with the sampled tokens. An actor that dies surfaces at
once as `WorkerDiedError` (its peers would otherwise hang inside a collective); the executor
then kills the others and reports itself dead. Works inside an existing Ray cluster (a Serve
replica, `ray start`) or starts a local Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.executor.base import WorkerDiedError
from ernie_cluster.executor.step_channel import StepChannelServer, StepChannelWorker, StepFailure
from ernie_cluster.step_io import ModelRunnerOutput, SchedulerOutput

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["RayExecutor", "RayWorker", "RayWorkerBase", "WorkerDiedError"]

HEALTH_TIMEOUT_S = 5.0


class RayWorkerBase:
    """Hosts one rank's `Worker` inside a Ray actor."""

    def __init__(self, config: EngineConfig, model_dir: str, rank: int) -> None:
        self.config = config
        self.model_dir = model_dir
        self.rank = rank
        self.worker = None

    def rendezvous_address(self) -> str:
        from ernie_cluster.distributed.process_group import free_port

        host = ray.util.get_node_ip_address()
        return f"tcp://{host}:{free_port(host)}"

    def start(self, init_method: str, num_threads: int) -> int:
        import torch

        from ernie_cluster.distributed.process_group import init_distributed
        from ernie_cluster.worker.worker import Worker

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        device = torch.device(self.config.device)
        if device.type == "cuda":
            device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to our GPU
            torch.cuda.set_device(device)
        # NOTE: chosen once here: the NCCL communicator only where W > 1 graphs are captured.
        graph_safe = self.config.multi_rank_cuda_graphs and not self.config.enforce_eager
        comm = init_distributed(
            self.rank,
            self.config.world_size,
            init_method,
            device,
            graph_safe_collectives=graph_safe,
        )
        self.worker = Worker(self.config, self.model_dir, self.rank, comm, device)
        return self.worker.num_kv_blocks

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        output = self.worker.execute_model(scheduler_output)
        return output if self.rank == 0 else None

    def serve_steps(self, address: str) -> None:
        """Connect to the driver's step channel and execute steps on a background thread."""
        self._step_channel = StepChannelWorker(address, self.rank, self.execute_model)

    def call(self, method: str, *args):
        result = getattr(self.worker, method)(*args)
        return result

    def ping(self) -> int:
        return os.getpid()


RayWorker = ray.remote(RayWorkerBase)


def _ensure_ray() -> None:
    if not ray.is_initialized():
        # Joins RAY_ADDRESS / a running `ray start` cluster if there is one, else starts Ray.
        ray.init(
            address=os.environ.get("RAY_ADDRESS"),
            include_dashboard=False,
            logging_level=logging.WARNING,
        )


def _current_placement_group(world_size: int, resource: str) -> PlacementGroup | None:
    """The caller's own placement group (a Serve replica's), if it has room for the shards."""
    group = ray.util.get_current_placement_group()
    if group is None:
        return None
    fitting = [b for b in group.bundle_specs if b.get(resource, 0) >= 1]
    return group if len(fitting) >= world_size else None


class RayExecutor:
    """Implements `executor.base.Executor` with one Ray actor per rank."""

    # NOTE: a rank that failed its step may have left its peers waiting inside a collective:
    # any failed step kills every rank (WorkerDiedError), and the engine dies with them.
    recovers_from_step_errors = False

    def __init__(
        self,
        config: EngineConfig,
        model_dir: str,
        placement_strategy: str = "STRICT_PACK",
        cpus_per_worker: int = 1,
        worker_cls=None,
        step_timeout_s: float | None = None,
    ) -> None:
        """`worker_cls`: a RayWorker subclass (tests and benchmarks inject stubs)."""
        _ensure_ray()
        self.config = config
        self.world_size = config.world_size
        self.step_timeout_s = step_timeout_s
        self._dead: BaseException | None = None
        self._channel: StepChannelServer | None = None
        use_gpu = config.device.startswith("cuda")
        resource = "GPU" if use_gpu else "CPU"
        self._own_group = False
        group = _current_placement_group(self.world_size, resource)
        if group is None:
            bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": cpus_per_worker}
            group = placement_group(
                [dict(bundle) for _ in range(self.world_size)], strategy=placement_strategy
            )
            self._own_group = True
            try:
                ray.get(group.ready(), timeout=60)
            except GetTimeoutError as exc:
                remove_placement_group(group)
                raise RuntimeError(
                    f"could not reserve {self.world_size} bundles of {bundle} "
                    f"({placement_strategy}) within 60 s: not enough {resource}s in the cluster"
                ) from exc
        self.placement_group = group
        # NOTE: the last W fitting bundles: in a Serve replica's group, bundle 0 holds the
        # replica itself.
        fitting = [i for i, b in enumerate(group.bundle_specs) if b.get(resource, 0) >= 1]
        bundle_ids = fitting[-self.world_size :]
        actor_cls = ray.remote(worker_cls) if worker_cls is not None else RayWorker
        self.workers = [
            actor_cls.options(
                num_cpus=0 if use_gpu else cpus_per_worker,
                num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group,
                    placement_group_bundle_index=bundle_ids[rank],
                ),
            ).remote(config, model_dir, rank)
            for rank in range(self.world_size)
        ]
        try:
            init_method = ray.get(self.workers[0].rendezvous_address.remote(), timeout=60)
            num_blocks = ray.get(
                [w.start.remote(init_method, cpus_per_worker) for w in self.workers]
            )
            self._channel = StepChannelServer(ray.util.get_node_ip_address())
            ray.get([w.serve_steps.remote(self._channel.address) for w in self.workers])
            self._channel.accept(self.world_size, timeout_s=60)
        except BaseException:
            self.shutdown()
            raise
        if len(set(num_blocks)) > 1:
            self.shutdown()
            raise RuntimeError(f"ranks disagree on KV cache size: {num_blocks}")
        self.num_kv_blocks = num_blocks[0]
        logger.info("Ray executor ready: %d workers (%s)", self.world_size, resource)

    # ------------------------------------------------------------------------- steps
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self._raise_if_dead()
        try:
            # NOTE: only rank 0 samples, so only it receives the grammar bitmask.
            others = scheduler_output
            if scheduler_output.grammar is not None:
                others = dataclasses.replace(scheduler_output, grammar=None)
            replies = self._channel.step(others, self.step_timeout_s, scheduler_output)
        except OSError as exc:  # a closed socket (dead worker) or a timeout
            self._mark_dead(exc)
            raise WorkerDiedError(f"a shard worker stopped answering: {exc}") from exc
        failures = [r for r in replies if isinstance(r, StepFailure)]
        if failures:
            error = RuntimeError(failures[0].message)
            self._mark_dead(error)
            raise WorkerDiedError(f"a shard worker failed its step: {failures[0].message}")
        return replies[0]

    def collective_rpc(self, method: str, *args, timeout: float | None = None) -> list:
        self._raise_if_dead()
        return self._wait_all([w.call.remote(method, *args) for w in self.workers], timeout)

    def _wait_all(self, refs: list, timeout: float | None = None) -> list:
        """Results of every rank; the first failure kills the instance and raises."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(refs)
        try:
            while pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, pending = ray.wait(pending, num_returns=1, timeout=left)
                if not ready:
                    raise GetTimeoutError(f"workers did not answer within {timeout} s")
                ray.get(ready[0])  # raises at once if that rank failed
            return ray.get(refs)
        except (RayError, GetTimeoutError) as exc:
            self._mark_dead(exc)
            raise WorkerDiedError(f"a shard worker failed: {exc}") from exc

    def check_health(self) -> None:
        """Raises WorkerDiedError unless every worker answers within 5 s."""
        self._raise_if_dead()
        try:
            ray.get([w.ping.remote() for w in self.workers], timeout=HEALTH_TIMEOUT_S)
        except (RayActorError, GetTimeoutError, RayError) as exc:
            self._mark_dead(exc)
            raise WorkerDiedError(f"a shard worker is not responding: {exc}") from exc

    def worker_pids(self) -> list[int]:
        """Each rank's process id (rank order)."""
        self._raise_if_dead()
        return self._wait_all([w.ping.remote() for w in self.workers], HEALTH_TIMEOUT_S)

    def expert_load(self) -> torch.Tensor:
        loads = self.collective_rpc("expert_load", timeout=HEALTH_TIMEOUT_S)
        return sum(loads[1:], loads[0])

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise WorkerDiedError(f"executor is dead: {self._dead}")

    def _mark_dead(self, exc: BaseException) -> None:
        if self._dead is None:
            self._dead = exc
            logger.error("shard worker failure, shutting the instance down: %s", exc)
            self._kill_workers()

    def _kill_workers(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        for worker in self.workers:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(worker, no_restart=True)

    def shutdown(self) -> None:
        self._kill_workers()
        self.workers = []
        if self._own_group and self.placement_group is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self.placement_group)
            self.placement_group = None
        if self._dead is None:
            self._dead = RuntimeError("executor is shut down")
