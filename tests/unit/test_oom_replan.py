"""Unit tests of the out-of-memory re-plan: the correction factor, its status record, and plans with it."""

from __future__ import annotations

from typing import Any

import pytest

from shardwise import oom_replan
from shardwise.inventory import Shape
from shardwise.planner.errors import PlanInputError
from shardwise.planner.request import PlannerSettings
from shardwise.planning import plan_job

GIB = 2**30
H100_NODE = Shape(1, 8, "NVIDIA-H100-80GB-HBM3", 81559 << 20, 1056 << 30, ("a",))


def spec() -> dict[str, Any]:
    return {
        "model": {"preset": "llama-2-7b"},
        "training": {"method": "full", "precision": "bf16", "sequenceLength": 4096, "globalBatchSize": 16},
        "resources": {"nodes": 1, "gpusPerNode": 8},
    }


@pytest.mark.parametrize(
    ("predicted", "capacity", "needed", "factor"),
    [
        (60 * GIB, 80 * GIB, None, 1.334),  # nothing measured: just over the GPU's memory
        (60 * GIB, 80 * GIB, 90 * GIB, 1.5),  # the measured need is the floor
        (60 * GIB, 80 * GIB, 10 * GIB, 1.334),  # a peak below capacity cannot lower the floor
        (80 * GIB, 80 * GIB, None, 1.001),
        (1 * GIB, 80 * GIB, 500 * GIB, 100.0),  # bounded like PlannerSettings.memory_correction
    ],
)
def test_the_correction_puts_the_failed_layout_over_the_gpu(
    predicted: int, capacity: int, needed: int | None, factor: float
) -> None:
    got = oom_replan.correction_factor(predicted, capacity, needed)
    assert got == factor
    if factor < oom_replan.MAX_CORRECTION:
        assert int(capacity / got) < predicted  # the planner's usable memory no longer holds it


@pytest.mark.parametrize(("predicted", "capacity"), [(0, 80), (80, 0), (-1, 80)])
def test_a_correction_needs_a_prediction(predicted: int, capacity: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        oom_replan.correction_factor(predicted, capacity, None)


@pytest.mark.parametrize(
    ("layout", "needed", "keys"),
    [
        (
            {"summary": "TP1×PP1×DP8 Z1", "predictedGpuMemoryBytes": 60 * GIB, "gpuMemoryBytes": 80 * GIB},
            None,
            {"factor", "predictedBytes", "gpuMemoryBytes", "layout", "attempt"},
        ),
        (
            {"summary": "TP1×PP1×DP8 Z1", "predictedGpuMemoryBytes": 60 * GIB, "gpuMemoryBytes": 80 * GIB},
            85 * GIB,
            {"factor", "predictedBytes", "gpuMemoryBytes", "layout", "attempt", "neededBytes"},
        ),
        ({"summary": "TP1×PP1×DP8 Z1"}, None, None),  # no prediction recorded: nothing to correct
    ],
)
def test_the_status_record(layout: dict[str, Any], needed: int | None, keys: set[str] | None) -> None:
    record = oom_replan.correction_record(layout, needed, attempt=2)
    if keys is None:
        assert record is None
        return
    assert record is not None and set(record) == keys and record["attempt"] == 2
    assert record["layout"].startswith("TP1×PP1×DP8 Z1 micro-batch")


@pytest.mark.parametrize(
    ("status", "correction", "may"),
    [({}, 1.0, True), ({"memoryCorrection": {"factor": 1.25}}, 1.25, False)],
)
def test_one_replan_per_job(status: dict[str, Any], correction: float, may: bool) -> None:
    assert oom_replan.current_correction(status) == correction
    assert oom_replan.may_replan(status) is may


@pytest.mark.parametrize("value", [0.5, 0.0, 101.0])
def test_the_planner_refuses_a_correction_out_of_bounds(value: float) -> None:
    with pytest.raises(PlanInputError, match="memory correction"):
        PlannerSettings(memory_correction=value)


def test_a_replan_with_the_correction_picks_another_layout_that_fits_the_corrected_prediction() -> None:
    first = plan_job(spec(), H100_NODE)
    assert first.feasible and first.layout_status is not None
    record = oom_replan.correction_record(first.layout_status, None, attempt=0)
    assert record is not None
    second = plan_job(spec(), H100_NODE, memory_correction=record["factor"])
    assert second.feasible and second.layout_status is not None
    assert oom_replan.describe(second.layout_status) != oom_replan.describe(first.layout_status)
    # The new layout's prediction, corrected, fits the GPU; the old one's does not.
    gpu = H100_NODE.gpu_memory_bytes or 0
    assert second.layout_status["predictedGpuMemoryBytes"] * record["factor"] <= gpu
    assert first.layout_status["predictedGpuMemoryBytes"] * record["factor"] > gpu
    assert second.layout_status["predictedGpuMemoryBytes"] < first.layout_status["predictedGpuMemoryBytes"]


def test_nothing_fits_with_a_large_correction_and_the_diagnosis_says_why() -> None:
    outcome = plan_job(spec(), H100_NODE, memory_correction=50.0)
    assert not outcome.feasible and outcome.reason == "InsufficientGpuMemory"
    assert "measured memory correction x50.000" in outcome.message
