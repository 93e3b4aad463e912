"""Unit tests of the pure status derivation: pod summaries, conditions, phases and Events."""

from __future__ import annotations

from typing import Any

import pytest

from shardwise.conditions import get_condition, set_condition
from shardwise.jobstatus import (
    changed_events,
    finished,
    needs_plan,
    planned_generation,
    with_plan,
    with_plan_failure,
    with_pods,
)
from shardwise.podstate import summarize

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"


def pod(rank: int, phase: str, attempt: int = 0, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"j-node-{rank}",
            "labels": {"shardwise.dev/node-rank": str(rank), "shardwise.dev/attempt": str(attempt)},
        },
        "spec": {"nodeName": f"n{rank}"},
        "status": {"phase": phase, **status},
    }


def failed(rank: int, code: int) -> dict[str, Any]:
    return pod(
        rank,
        "Failed",
        containerStatuses=[
            {"name": "trainer", "state": {"terminated": {"exitCode": code, "reason": "Error"}}}
        ],
    )


UNSCHEDULABLE = {
    "conditions": [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
        }
    ]
}


@pytest.mark.parametrize(
    ("pods", "phase", "running", "extra"),
    [
        ([], "Starting", ("False", "PodsStarting"), None),
        ([pod(0, "Running")], "Starting", ("False", "PodsStarting"), None),
        (
            [pod(0, "Running"), pod(1, "Pending", **UNSCHEDULABLE)],
            "Starting",
            ("False", "Unschedulable"),
            None,
        ),
        ([pod(0, "Running"), pod(1, "Running")], "Running", ("True", "AllPodsRunning"), None),
        ([pod(0, "Succeeded"), pod(1, "Running")], "Running", ("True", "AllPodsRunning"), None),
        (
            [pod(0, "Succeeded"), pod(1, "Succeeded")],
            "Succeeded",
            ("False", "Completed"),
            ("Succeeded", "AllPodsSucceeded"),
        ),
        (
            [pod(0, "Running"), failed(1, 3)],
            "Failed",
            ("False", "TrainerExitedWithError"),
            ("Failed", "TrainerExitedWithError"),
        ),
        (
            [pod(0, "Running", attempt=1), pod(1, "Running", attempt=1)],
            "Starting",
            ("False", "PodsStarting"),
            None,
        ),
    ],
)
def test_phase_from_pods(
    pods: list[dict[str, Any]], phase: str, running: tuple[str, str], extra: tuple[str, str] | None
) -> None:
    summary = summarize(pods, expected=2, attempt=0)
    status = with_pods({}, summary, now=T0, generation=4)
    assert status["phase"] == phase
    cond = get_condition(status["conditions"], "Running")
    assert cond is not None
    assert (cond["status"], cond["reason"]) == running
    assert cond["observedGeneration"] == 4
    if extra:
        done = get_condition(status["conditions"], extra[0])
        assert done is not None
        assert (done["status"], done["reason"]) == ("True", extra[1])
        assert status["completionTime"] == T0
        assert finished(status)


def test_failure_message_names_pod_node_and_exit_code() -> None:
    status = with_pods(
        {}, summarize([pod(0, "Running"), failed(1, 3)], expected=2, attempt=0), now=T0, generation=1
    )
    assert "j-node-1" in status["message"]
    assert "node n1" in status["message"]
    assert "code 3" in status["message"]


def succeeded(rank: int, message: str) -> dict[str, Any]:
    terminated = {"exitCode": 0, "reason": "Completed", "message": message}
    return pod(
        rank, "Succeeded", containerStatuses=[{"name": "trainer", "state": {"terminated": terminated}}]
    )


@pytest.mark.parametrize(
    ("messages", "output"),
    [
        (["shardwise.dev/exit-code=0\nshardwise.dev/output=/output/adapter\n", ""], "/output/adapter"),
        (["", "shardwise.dev/output=/out/model"], "/out/model"),
        (["", ""], None),
        (["done\nlast log line", "shardwise.dev/output="], None),
    ],
)
def test_a_succeeded_job_says_where_the_result_was_saved(messages: list[str], output: str | None) -> None:
    pods = [succeeded(rank, message) for rank, message in enumerate(messages)]
    status = with_pods({}, summarize(pods, expected=2, attempt=0), now=T0, generation=1)
    assert status["phase"] == "Succeeded"
    assert status.get("outputPath") == output
    assert (output is not None and output in status["message"]) or output is None


def test_unschedulable_message_carries_the_scheduler_reason() -> None:
    summary = summarize([pod(0, "Pending", **UNSCHEDULABLE)], expected=1, attempt=0)
    status = with_pods({}, summary, now=T0, generation=1)
    assert "Insufficient nvidia.com/gpu" in status["message"]


def test_summary_missing_and_stale() -> None:
    summary = summarize([pod(1, "Running"), pod(0, "Running", attempt=2)], expected=3, attempt=0)
    assert summary.missing == [0, 2]
    assert summary.stale == ("j-node-0",)


def test_transition_time_moves_only_on_status_flip() -> None:
    conds = set_condition([], "Running", False, "PodsStarting", "a", now=T0)
    conds = set_condition(conds, "Running", False, "Unschedulable", "b", now=T1)
    assert conds[0]["lastTransitionTime"] == T0
    conds = set_condition(conds, "Running", True, "AllPodsRunning", "c", now=T1)
    assert conds[0]["lastTransitionTime"] == T1
    assert len(conds) == 1


def test_unchanged_pass_produces_identical_status() -> None:
    pods = [pod(0, "Running"), pod(1, "Running")]
    first = with_pods({}, summarize(pods, expected=2, attempt=0), now=T0, generation=1)
    second = with_pods(first, summarize(pods, expected=2, attempt=0), now=T1, generation=1)
    assert first == second


def test_events_on_changes_only() -> None:
    planned = with_plan({}, {"summary": "TP1×PP1×DP8 Z1"}, "fits", now=T0, generation=1)
    events = changed_events({}, planned)
    assert [(e.type, e.reason) for e in events] == [("Normal", "LayoutPlanned")]
    assert changed_events(planned, planned) == []
    infeasible = with_plan_failure({}, "InsufficientGpuMemory", "needs 9 GiB more", now=T0, generation=1)
    assert [(e.type, e.reason) for e in changed_events({}, infeasible)] == [
        ("Warning", "InsufficientGpuMemory")
    ]
    assert infeasible["phase"] == "Pending"
    starting = with_pods(planned, summarize([], expected=1, attempt=0), now=T0, generation=1)
    assert changed_events(planned, starting) == []  # Running=False appearing is not news


def test_setting_a_condition_keeps_the_order() -> None:
    conds = set_condition([], "Planned", True, "LayoutPlanned", "a", now=T0)
    conds = set_condition(conds, "Running", True, "AllPodsRunning", "b", now=T0)
    conds = set_condition(conds, "Planned", True, "LayoutPlanned", "a", now=T1)
    assert [c["type"] for c in conds] == ["Planned", "Running"]


def planned(generation: int | None, *, status: str = "True", layout: bool = True) -> dict[str, Any]:
    """A status whose Planned condition carries that generation."""
    cond: dict[str, Any] = {"type": "Planned", "status": status, "reason": "LayoutPlanned"}
    if generation is not None:
        cond["observedGeneration"] = generation
    out: dict[str, Any] = {"conditions": [cond]}
    if layout:
        out["layout"] = {"nodes": 1, "gpusPerNode": 2}
    return out


@pytest.mark.parametrize(
    ("status", "generation", "started", "expected"),
    [
        ({}, 1, False, True),  # never planned
        (planned(1), 1, False, False),  # planned for this spec
        (planned(1), 4, False, True),  # resized while suspended, resumed: re-planned
        (planned(1), 4, True, False),  # a running attempt keeps its plan
        (planned(1, status="False"), 1, True, True),  # the plan failed: plan again
        (planned(1, layout=False), 1, True, True),  # layout dropped (node lost): plan again
        (planned(None), 2, False, True),  # a plan of unknown generation is not this spec's
    ],
    ids=["unplanned", "current", "resized", "running", "failed", "no-layout", "no-generation"],
)
def test_needs_plan(status: dict[str, Any], generation: int, started: bool, expected: bool) -> None:
    assert needs_plan(status, generation, attempt_started=started) is expected


def test_planned_generation_is_the_planned_conditions() -> None:
    assert planned_generation(planned(3)) == 3
    assert planned_generation(planned(3, status="False")) is None
    assert planned_generation(planned(3, layout=False)) is None
    after = with_plan({}, {"nodes": 2}, "m", now=T0, generation=5)
    assert planned_generation(after) == 5
