"""A decode step reads nothing back from the device but its sampled tokens, and its forward
is graph-safe: counted with a torch dispatch mode over `ModelRunner.execute_model` at W = 1,
and compiled with `torch.compile(fullgraph=True, backend="eager")` (the CPU proxy for CUDA-graph
capture: it fails at the first host read)."""

from __future__ import annotations

import pytest
import torch

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.loader.model_loader import load_model
from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.step_io import (
    CachedRequestData,
    NewRequestData,
    SchedulerOutput,
)
from ernie_cluster.worker.model_runner import ModelRunner
from ernie_cluster_tools.diagnostics import SyncRecorder, use_sync_free_experts

BLOCK_SIZE = 4


def make_runner(checkpoint, **overrides) -> ModelRunner:
    config = EngineConfig(
        model=str(checkpoint),
        dtype="float32",
        max_model_len=256,
        max_num_seqs=8,
        block_size=BLOCK_SIZE,
        show_progress=False,
        **overrides,
    )
    model = load_model(checkpoint, dtype="float32", show_progress=False)
    use_sync_free_experts(model)  # the GPU step's MoE path: the CPU default reads counts
    return ModelRunner(model, num_blocks=64, config=config, device="cpu")


def prefill_then_decode(runner: ModelRunner, params: list[SamplingParams]):
    """Three prompts prefilled in one step; returns the next step (one decode each)."""
    lengths = [5, 9, 12]
    new, next_blocks = [], 0
    for i, (length, p) in enumerate(zip(lengths, params, strict=True)):
        blocks = list(range(next_blocks, next_blocks + 4))  # room for 16 tokens
        next_blocks += 4
        new.append(
            NewRequestData(
                req_id=f"r{i}",
                prompt_token_ids=[(7 * i + j) % 200 + 3 for j in range(length)],
                params=p,
                stop_token_ids=[2],
                sample_index=0,
                block_ids=blocks,
                num_computed_tokens=0,
            )
        )
    first = runner.execute_model(
        SchedulerOutput(
            new_requests=new, num_scheduled_tokens={n.req_id: len(n.prompt_token_ids) for n in new}
        )
    )
    assert set(first.sampled_token_ids) == {"r0", "r1", "r2"}
    cached = [CachedRequestData(f"r{i}", [], lengths[i]) for i in range(3)]
    return SchedulerOutput(
        cached_requests=cached, num_scheduled_tokens={f"r{i}": 1 for i in range(3)}
    )


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams(temperature=0.0, max_tokens=4)] * 3,
        [
            SamplingParams(temperature=0.0, max_tokens=4, logprobs=3),
            SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=1, max_tokens=4),
            SamplingParams(temperature=1.0, min_p=0.1, presence_penalty=0.5, max_tokens=4),
        ],
    ],
    ids=["greedy", "mixed-sampling"],
)
def test_decode_step_has_no_host_syncs(tiny_checkpoint, params):
    runner = make_runner(tiny_checkpoint)
    decode = prefill_then_decode(runner, params)
    with SyncRecorder() as recorder:
        out = runner.execute_model(decode)
    assert set(out.sampled_token_ids) == {"r0", "r1", "r2"}
    assert recorder.syncs == [], f"host syncs in a decode step: {recorder.syncs}"
    # The one device->host copy: the sampled tokens (with logprobs when asked).
    assert recorder.readouts == ["tolist"], recorder.readouts


def test_recorder_sees_the_old_patterns(tiny_checkpoint):
    """The recorder is not blind to what steps used to do: `.item()` and `.tolist()`."""
    with SyncRecorder() as recorder:
        torch.arange(4).sum().item()
        torch.arange(4).tolist()
    assert recorder.syncs == ["aten._local_scalar_dense.default"]
    assert recorder.readouts == ["item", "tolist"]


def test_decode_forward_compiles_fullgraph(tiny_checkpoint):
    """The decode forward has no graph break: what CUDA-graph capture needs."""
    runner = make_runner(tiny_checkpoint)
    decode = prefill_then_decode(runner, [SamplingParams(temperature=0.0, max_tokens=4)] * 3)
    runner.update_states(decode)
    inputs, _ = runner._prepare(decode)
    model = runner.model
    eager = model(inputs.input_ids, inputs.positions, inputs.meta)
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    hidden = compiled(inputs.input_ids, inputs.positions, inputs.meta)
    torch.testing.assert_close(hidden, eager)


# ------------------------------------------------------------------- W = 2 over gloo


def _rank_main(rank: int, world: int, port: int, checkpoint: str, out_dir: str) -> None:
    """One rank: prefill, then one decode step under the counters; results as JSON."""
    import json
    from pathlib import Path

    import torch.distributed as dist
    from rank_helpers import init_gloo

    from ernie_cluster.distributed.communicator import Communicator
    from ernie_cluster.model.sharding import ShardSpec

    init_gloo(rank, world, port)
    result: dict = {}
    try:
        config = EngineConfig(
            model=checkpoint,
            dtype="float32",
            tensor_parallel_size=world,
            expert_parallel_size=world,
            max_model_len=256,
            max_num_seqs=8,
            block_size=BLOCK_SIZE,
            show_progress=False,
        )
        model = load_model(
            checkpoint,
            dtype="float32",
            shard=ShardSpec(rank, world),
            show_progress=False,
            comm=Communicator(rank, world),
        )
        use_sync_free_experts(model)
        runner = ModelRunner(model, num_blocks=64, config=config, device="cpu")
        params = [SamplingParams(temperature=0.0, max_tokens=4, logprobs=2)] * 3
        decode = prefill_then_decode(runner, params)
        with SyncRecorder() as recorder:
            out = runner.execute_model(decode)
        result = {
            "syncs": recorder.syncs,
            "readouts": recorder.readouts,
            "tokens": out.sampled_token_ids,
            "collectives": sum(n for op, n in recorder.ops.items() if op.startswith("c10d::")),
        }
        dist.barrier()
    finally:
        dist.destroy_process_group()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_decode_step_has_no_host_syncs_on_each_rank_at_w2(tiny_checkpoint, tmp_path):
    import json

    from rank_helpers import spawn_ranks

    spawn_ranks(_rank_main, 2, (str(tiny_checkpoint), str(tmp_path)), timeout_s=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(ranks):
        assert result["syncs"] == [], f"rank {rank}: {result['syncs']}"
        # Rank 0 copies tokens and logprobs back once; rank 1 its broadcast copy of the tokens.
        assert result["readouts"] == ["tolist"], f"rank {rank}: {result['readouts']}"
        assert result["collectives"] > 0  # the step really exchanged activations
    assert ranks[0]["tokens"] == ranks[1]["tokens"]
    assert set(ranks[0]["tokens"]) == {"r0", "r1", "r2"}
