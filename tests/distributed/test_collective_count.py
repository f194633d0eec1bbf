"""Collectives per decode step at W = 2 and 4 over gloo: at most 2 per decoder layer
(attention and MoE together) in the replicated layout the engine picks at decode sizes, against
5 per MoE layer in the token-sharded one; both layouts give W = 1's greedy tokens on decode,
prefill and mixed steps, with no host sync on a decode or prefill step, and route every token
once (expert counters summed over the ranks equal W = 1's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runner_helpers import make_runner

from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.distributed.layout import layer_traffic
from ernie_cluster.worker.model_runner import ModelRunner
from ernie_cluster.worker.step_script import mixed_script

pytestmark = pytest.mark.slow

# 8 query heads, 4 kv heads and 8 experts split over 4 ranks; top-2 routing (k < W at W = 4).
OVERRIDES = dict(num_attention_heads=8, num_key_value_heads=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from ernie_cluster_tools.fixtures.make_tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("w4"), preset="tiny", seed=3, overrides=OVERRIDES
    )


def run_script(runner: ModelRunner, layout: str) -> dict:
    """The mixed script under `layout`; per step: its kind and census (at W > 1)."""
    from ernie_cluster_tools.census import census_step
    from ernie_cluster_tools.diagnostics import use_sync_free_experts

    use_sync_free_experts(runner.model)  # the GPU step's MoE path: the CPU default reads counts
    runner.model.collective_layout = layout
    script, steps = mixed_script()
    census = []
    for scheduled in steps:
        out, counted = census_step(runner, script.step(scheduled))
        script.record(out)
        kind = "decode" if set(scheduled.values()) == {1} else "prefill"
        census.append({"kind": kind, **counted.__dict__})
    load = runner.model.expert_load()
    return {"tokens": script.sampled, "census": census, "load": load.tolist()}


def _rank_main(rank: int, world: int, port: int, checkpoint: str, out_dir: str) -> None:
    import torch.distributed as dist
    from rank_helpers import init_gloo

    init_gloo(rank, world, port)
    result = {}
    try:
        for layout in ("sharded", "auto"):
            result[layout] = run_script(make_runner(checkpoint, rank, world), layout)
        dist.barrier()
    finally:
        dist.destroy_process_group()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.parametrize("world", [2, 4])
def test_decode_step_has_at_most_two_collectives_per_layer(checkpoint, tmp_path, world):
    from rank_helpers import spawn_ranks

    torch.manual_seed(0)
    reference = run_script(make_runner(checkpoint), "auto")
    spawn_ranks(_rank_main, world, (str(checkpoint), str(tmp_path)), timeout_s=400)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    num_layers = len(reference["census"][0]["per_layer"])
    config = ErnieMoeConfig.from_pretrained(checkpoint)
    for rank, result in enumerate(ranks):
        for layout in ("sharded", "auto"):
            run = result[layout]
            assert run["tokens"] == reference["tokens"], f"rank {rank} {layout}"
        auto, sharded = result["auto"]["census"], result["sharded"]["census"]
        for step, (new, old) in enumerate(zip(auto, sharded, strict=True)):
            assert len(new["per_layer"]) == num_layers
            assert new["syncs"] == [], f"rank {rank} step {step}: {new['syncs']}"
            if new["kind"] != "decode":
                continue
            assert max(new["per_layer"]) <= 2, f"rank {rank} step {step}: {new['per_layer']}"
            # embedding, the layers, the logits gather and the sampled tokens' broadcast
            assert new["total"] == sum(new["per_layer"]) + 3
            # the token-sharded layout it replaces: 2 + 3 all-to-alls per MoE layer
            assert max(old["per_layer"]) == 5
            assert new["total"] < old["total"]
            # distributed/layout's model of both (what gpu_roofline.py estimates from)
            for layer in range(num_layers):
                is_moe = config.is_moe_layer(layer)
                for replicated, got in ((True, new), (False, old)):
                    modelled = layer_traffic(replicated, 3, world, 64, 2, is_moe).collectives
                    assert got["per_layer"][layer] == modelled, (layer, replicated)
    # Every token routed once: the ranks' expert counters add up to W = 1's, per layer.
    for layout in ("sharded", "auto"):
        summed = torch.tensor([r[layout]["load"] for r in ranks]).sum(0)
        assert summed.tolist() == reference["load"], layout
