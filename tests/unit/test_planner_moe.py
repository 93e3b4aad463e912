"""Mixture-of-experts planning: expert-parallel memory per GPU, EP errors, top-k compute, admission."""

from __future__ import annotations

from dataclasses import replace
from math import ceil

import pytest

from shardwise.inventory import Shape
from shardwise.planner import (
    PRESETS,
    Cluster,
    Pins,
    PlanInputError,
    PlannerSettings,
    PlanRequest,
    TrainingSettings,
    gpu,
    plan,
)
from shardwise.planner import capabilities as caps
from shardwise.planner.architecture import Architecture, ModelSpec
from shardwise.planning import plan_job

MIXTRAL = PRESETS["mixtral-8x7b"].architecture
EXPLORE = PlannerSettings(plan_expert_parallel_beyond_runtime=True)


def _request(ep: int | None, *, tp: int = 1, zero: int = 1, gpus: int = 8, **kw: object) -> PlanRequest:
    return PlanRequest(
        model=ModelSpec("mixtral-8x7b", MIXTRAL),
        cluster=Cluster(nodes=gpus // 8, gpus_per_node=8, gpu=gpu("H200")),
        training=TrainingSettings(method="full", precision="bf16", sequence_length=1024, global_batch_size=8),
        pins=Pins(
            tp=tp, pp=1, zero_stage=zero, micro_batch=1, checkpointing="full", offload="none", expert=ep
        ),
        settings=EXPLORE,
        **kw,  # type: ignore[arg-type]
    )


def test_mixtral_hand_count() -> None:
    h, f, layers, v = 4096, 14336, 32, 32000
    attention = 2 * h * h + 2 * h * (8 * 128)
    dense = layers * (attention + h * 8 + 2 * h) + 2 * v * h + h  # + router, norms, embedding, head
    experts = layers * 8 * 3 * h * f
    assert dense + experts == MIXTRAL.total_params == 46_702_792_704


@pytest.mark.parametrize("ep", [1, 2, 8])
def test_mixtral_model_states_per_gpu_under_ep(ep: int) -> None:
    """8 GPUs, DP 8, ZeRO-1, bf16 with fp32 master states (2 + 2 + 12 bytes per parameter).

    A GPU holds all non-expert parameters P_d and 1/ep of the routed experts P_e; ZeRO-1 shards
    the optimizer states of P_d over the 8 data-parallel ranks and those of its expert shard over
    the 8/ep ranks holding the same experts."""
    h, f, layers, v = 4096, 14336, 32, 32000
    p_dense = layers * (2 * h * h + 2 * h * 1024 + h * 8 + 2 * h) + 2 * v * h + h
    p_experts = layers * 8 * 3 * h * f
    shard = p_experts // ep
    result = plan(_request(ep))
    memory = result.choice.memory if result.choice else None
    assert memory is not None and result.choice is not None and result.choice.layout.ep == ep
    assert memory.parameters == 2 * (p_dense + shard)
    assert memory.gradients == 2 * (p_dense + shard)
    assert memory.optimizer_states == ceil(12 * p_dense / 8) + ceil(12 * shard / (8 // ep))
    # Router logits and the routed tokens are activations; EP adds the all-to-all buffers.
    assert (
        result.choice.step_time.expert_all_to_all == 0.0
        if ep == 1
        else result.choice.step_time.expert_all_to_all > 0
    )


def test_ep_moves_experts_not_the_rest() -> None:
    one, eight = (plan(_request(ep)).choice for ep in (1, 8))
    assert one is not None and eight is not None
    saved = one.memory.parameters - eight.memory.parameters
    assert saved == 2 * (MIXTRAL.expert_params_per_layer * 32 * 7 // 8)


@pytest.mark.parametrize(
    ("ep", "tp", "message"),
    [
        (3, 1, "EP=3 does not divide the 8 routed experts"),
        (16, 1, "EP=16 does not divide the 8 routed experts"),
    ],
)
def test_ep_input_errors_are_clear(ep: int, tp: int, message: str) -> None:
    with pytest.raises(PlanInputError, match=message):
        plan(_request(ep, tp=tp))


def test_ep_that_does_not_divide_dp_is_a_named_rejection() -> None:
    result = plan(_request(8, tp=2))  # 8 GPUs / TP 2 = DP 4
    assert not result.feasible
    assert any("EP=8 does not divide DP=4" in r.reason for r in result.rejected)


def test_ep_on_a_dense_model_is_an_input_error() -> None:
    dense = PlanRequest(
        model=ModelSpec("llama-2-7b", PRESETS["llama-2-7b"].architecture),
        cluster=Cluster(nodes=1, gpus_per_node=8, gpu=gpu("H100-80GB-SXM")),
        pins=Pins(expert=2),
    )
    with pytest.raises(PlanInputError, match="needs a mixture-of-experts model"):
        plan(dense)


def test_compute_counts_the_top_k_experts_only() -> None:
    dense_twin = replace(MIXTRAL, experts=0, experts_per_token=0, expert_ffn_hidden_size=0)
    # Two experts per token = a dense MLP twice as wide, plus the router.
    assert MIXTRAL.layer_matmul_weights == dense_twin.layer_matmul_weights + 3 * 4096 * 14336 + 4096 * 8


def test_cli_plans_ep_with_a_note_and_admission_does_not() -> None:
    explored = plan(_request(8))
    assert explored.feasible and explored.choice is not None and explored.choice.layout.ep == 8
    assert any("EP8: shardwise's trainer does not run expert parallelism" in n for n in explored.notes)
    refused = plan(replace(_request(8), settings=PlannerSettings()))
    assert not refused.feasible and refused.layouts_considered == 0
    assert any("expert=8: expert parallelism is not run" in r.reason for r in refused.rejected)
    unpinned = plan(replace(_request(None), settings=PlannerSettings()))
    assert unpinned.choice is not None and unpinned.choice.layout.ep == 1 and not unpinned.notes


def test_admission_refuses_a_pinned_ep_as_unsupported_by_runtime() -> None:
    shape = Shape(2, 8, "NVIDIA-H100-80GB-HBM3", 81559 << 20, 2048 << 30, ("a", "b"))
    spec = {
        "model": {"preset": "mixtral-8x7b"},
        "training": {"method": "full", "precision": "bf16", "sequenceLength": 1024, "globalBatchSize": 16},
        "resources": {"nodes": 2, "gpusPerNode": 8},
        "parallelism": {"expert": 2},
    }
    outcome = plan_job(spec, shape)
    assert not outcome.feasible and outcome.reason == "UnsupportedByRuntime"
    assert "expert=2" in outcome.message
    del spec["parallelism"]
    planned = plan_job(spec, shape)
    assert planned.feasible and planned.layout_status is not None and planned.layout_status["expert"] == 1


def test_architecture_checks_the_moe_fields() -> None:
    with pytest.raises(PlanInputError, match=r"expertsPerToken=9 must be 1\.\.experts=8"):
        replace(MIXTRAL, experts_per_token=9)
    assert isinstance(MIXTRAL, Architecture)


def test_capability_table_refuses_ep_above_one_for_every_row() -> None:
    for row in caps.TABLE:
        common = dict(method=row.method, model=row.model, tp=1, pp=1, sequence_parallel=False)
        assert caps.refusal(**common, zero_stage=0, offload="none", expert=1) is None  # type: ignore[arg-type]
        refused = caps.refusal(**common, zero_stage=0, offload="none", expert=2)  # type: ignore[arg-type]
        assert refused is not None and "expert=2" in refused
