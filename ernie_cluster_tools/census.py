"""Counting the collectives and bytes of one engine step on one rank, per decoder layer.

Every torch.distributed collective reaches the dispatcher as a `c10d::` op, so a
`SyncRecorder` over the step counts them whoever called them (the communicator, the sampler's
token broadcast); forward hooks on the decoder layers attribute them to layers. Bytes are the
communicator's own count. For tests and benchmarks/bench_collectives.py; holds no state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ernie_cluster_tools.diagnostics import SyncRecorder


@dataclass
class StepCensus:
    per_layer: list[int] = field(default_factory=list)
    """Collectives issued inside each decoder layer's forward, in layer order."""
    total: int = 0
    """Collectives of the whole step (embedding, layers, logits, sampled-token broadcast)."""
    bytes_sent: dict[str, int] = field(default_factory=dict)
    """Bytes this rank sent to other ranks during the step, by collective."""
    syncs: list[str] = field(default_factory=list)


def _collectives(recorder: SyncRecorder) -> int:
    return sum(n for op, n in recorder.ops.items() if op.startswith("c10d::"))


def census_step(runner, scheduler_output) -> tuple[object, StepCensus]:
    """Run `runner.execute_model(scheduler_output)` and count what it exchanged."""
    model = runner.model
    census = StepCensus()
    recorder = SyncRecorder()
    marks: list[int] = []

    def before(module, args, kwargs=None):
        marks.append(_collectives(recorder))

    def after(module, args, output):
        census.per_layer.append(_collectives(recorder) - marks.pop())

    handles = [layer.register_forward_pre_hook(before) for layer in model.layers]
    handles += [layer.register_forward_hook(after) for layer in model.layers]
    bytes_before = model.comm.bytes_sent
    try:
        with recorder:
            out = runner.execute_model(scheduler_output)
    finally:
        for handle in handles:
            handle.remove()
    bytes_after = model.comm.bytes_sent
    census.total = _collectives(recorder)
    census.bytes_sent = {k: bytes_after[k] - bytes_before.get(k, 0) for k in bytes_after}
    census.syncs = list(recorder.syncs)
    return out, census
