"""Unit tests of the operator's planning glue: spec + node shape -> layout document or a reason."""

from __future__ import annotations

from typing import Any

import pytest

from shardwise.inventory import Shape
from shardwise.planning import plan_job

H100 = Shape(2, 8, "NVIDIA-H100-80GB-HBM3", 81559 << 20, 1056 << 30, ("a", "b"))
ONE_H100_NODE = Shape(1, 8, "NVIDIA-H100-80GB-HBM3", 81559 << 20, 1056 << 30, ("a",))


def spec(**sections: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"preset": "llama-2-7b"},
        "training": {"method": "full", "precision": "bf16", "sequenceLength": 4096, "globalBatchSize": 16},
        "resources": {"nodes": 2, "gpusPerNode": 8},
    }
    base.update(sections)
    return base


def test_a_feasible_plan_gives_the_document_and_the_status_layout() -> None:
    outcome = plan_job(spec(), H100)
    assert outcome.feasible and outcome.reason == "LayoutPlanned"
    assert outcome.document is not None and outcome.layout_status is not None
    assert outcome.layout_status["gpus"] == 16
    assert outcome.layout_status["summary"].startswith("TP")
    assert outcome.document["deepspeed"]["train_batch_size"] == 16


def test_pins_from_a_status_layout_reproduce_the_plan() -> None:
    first = plan_job(spec(), H100)
    again = plan_job(spec(), H100, pins=first.layout_status)
    assert again.layout_status == first.layout_status
    assert again.document == first.document


def test_identical_requests_give_equal_plans_but_never_one_object() -> None:
    one, two = (
        plan_job(spec(), H100),
        plan_job(
            spec(), Shape(2, 8, H100.product, H100.gpu_memory_bytes, H100.host_memory_bytes, ("c", "d"))
        ),
    )
    assert one.document == two.document
    assert one.document is not two.document
    assert one.layout_status is not two.layout_status


@pytest.mark.parametrize(
    ("sections", "shape", "reason"),
    [
        (
            {
                "model": {"preset": "qwen2-72b"},
                "training": {"method": "full", "offload": "none"},
                "resources": {"nodes": 1, "gpusPerNode": 8},
            },
            ONE_H100_NODE,
            "InsufficientGpuMemory",
        ),
        ({"model": {"preset": "no-such-model"}}, H100, "InvalidSpec"),
        ({}, Shape(1, 8, "unknown", None, None), "UnknownGpuMemory"),
    ],
)
def test_reasons_for_not_planning(sections: dict[str, Any], shape: Shape, reason: str) -> None:
    outcome = plan_job(spec(**sections), shape)
    assert not outcome.feasible
    assert outcome.reason == reason
    assert outcome.message


@pytest.mark.parametrize(
    ("shards", "tp", "pp"),
    [((4, 2), 4, 2), ((2, 4), 2, 4)],
)
def test_a_replan_keeps_the_tp_and_pp_of_a_checkpoint_with_both(
    shards: tuple[int, int], tp: int, pp: int
) -> None:
    outcome = plan_job(spec(resources={"gpus": 8}), ONE_H100_NODE, checkpoint_shards=shards)
    assert outcome.feasible and outcome.layout_status is not None, outcome.message
    assert (outcome.layout_status["tensor"], outcome.layout_status["pipeline"]) == (tp, pp)


@pytest.mark.parametrize(
    ("shards", "pins"),
    [
        # PP1: TP converts, so the re-plan is the best plan at PP1.
        ((1, 1), {"pipeline": 1}),
        ((2, 1), {"pipeline": 1}),
        ((8, 1), {"pipeline": 1}),
        # TP1 and PP > 1: pipeline depth converts, so the best plan at TP1.
        ((1, 2), {"tensor": 1}),
        ((1, 4), {"tensor": 1}),
    ],
)
def test_a_replan_changes_only_what_the_trainer_converts(
    shards: tuple[int, int], pins: dict[str, int]
) -> None:
    free = plan_job(spec(resources={"gpus": 8}, parallelism=pins), ONE_H100_NODE)
    outcome = plan_job(spec(resources={"gpus": 8}), ONE_H100_NODE, checkpoint_shards=shards)
    assert outcome.feasible and outcome.layout_status is not None and free.layout_status is not None
    key = ("tensor", "pipeline")
    assert [outcome.layout_status[k] for k in key] == [free.layout_status[k] for k in key]


def test_a_replan_that_only_fits_at_another_tp_or_pp_is_refused_not_restarted_from_zero() -> None:
    outcome = plan_job(spec(resources={"gpus": 8}), ONE_H100_NODE, checkpoint_shards=(8, 2))
    assert not outcome.feasible and outcome.reason == "CheckpointNotResumable"
    assert "written at tp=8, pp=2" in outcome.message
    assert (
        "move the checkpoint directory away" in outcome.message
        and "would fit, from step 0" in outcome.message
    )


def test_pins_of_the_spec_win_over_the_checkpoint_shards() -> None:
    pinned = spec(resources={"gpus": 8}, parallelism={"tensor": 2})
    outcome = plan_job(pinned, ONE_H100_NODE, checkpoint_shards=(1, 1))
    assert outcome.feasible and outcome.layout_status is not None
    assert outcome.layout_status["tensor"] == 2


def test_the_status_layout_names_the_gpu_product_and_the_host_memory_offload_needs() -> None:
    plain = plan_job(spec(), H100)
    assert plain.layout_status is not None
    assert plain.layout_status["gpuProduct"] == "NVIDIA-H100-80GB-HBM3"
    assert plain.layout_status["hostMemoryBytes"] == 0
    training = {"method": "full", "precision": "bf16", "sequenceLength": 4096, "globalBatchSize": 16}
    offloaded = plan_job(spec(training={**training, "offload": "optimizer"}), H100)
    assert offloaded.layout_status is not None and offloaded.layout_status["offload"] == "optimizer"
    assert offloaded.document is not None
    assert (
        offloaded.layout_status["hostMemoryBytes"]
        == offloaded.document["predicted"]["cpu_memory_per_node"]
        > 0
    )
