"""Unit tests of the GPU queue without a batch scheduler: claims of planned jobs and unbound pods,
and FIFO order within PriorityClass order."""

from __future__ import annotations

from typing import Any

import pytest
from tests.unit.test_inventory import inv, node, pod

from shardwise.gpu_queue import ahead_in_queue, holds_plan, plan_claims, queue_order, waiting_for_gpus
from shardwise.inventory import Claim, reserve, unbound_pod_claims


def job(
    name: str,
    created: str = "2026-12-07T10:00:00Z",
    *,
    layout: dict[str, Any] | None = None,
    reason: str | None = None,
    finished: bool = False,
    suspend: bool = False,
    pool: str | None = None,
    priority_class: str | None = None,
) -> dict[str, Any]:
    conditions: list[dict[str, Any]] = []
    if reason is not None:
        conditions.append({"type": "Planned", "status": "False", "reason": reason})
    if finished:
        conditions.append({"type": "Succeeded", "status": "True", "reason": "AllPodsSucceeded"})
    status: dict[str, Any] = {"conditions": conditions}
    if layout is not None:
        status["layout"] = layout
    template: dict[str, Any] = {"containers": []}
    if priority_class:
        template["priorityClassName"] = priority_class
    return {
        "metadata": {"name": name, "namespace": "ml", "creationTimestamp": created},
        "spec": {
            "resources": {"nodes": 2, "gpusPerNode": 8, **({"nodeSelector": {"pool": pool}} if pool else {})},
            "runPolicy": {"suspend": suspend},
            "template": {"spec": template},
        },
        "status": status,
    }


TWO_BY_EIGHT = {"nodes": 2, "gpusPerNode": 8}


@pytest.mark.parametrize(
    ("free", "claims", "left"),
    [
        ({"a": 8, "b": 8}, [], {"a": 8, "b": 8}),
        # One pod per node: two pods of 8 take both nodes.
        ({"a": 8, "b": 8, "c": 8}, [Claim(2, 8)], {"a": 0, "b": 0, "c": 8}),
        # The roomiest node first, as the scheduler's spreading would.
        ({"a": 4, "b": 8}, [Claim(1, 4)], {"a": 4, "b": 4}),
        # Only nodes the holder may use, never one it already runs on.
        (
            {"a": 8, "b": 8, "c": 8},
            [Claim(1, 8, nodes=frozenset({"b", "c"}), avoid=frozenset({"c"}))],
            {"a": 8, "b": 0, "c": 8},
        ),
        # A pod that fits nowhere whole still takes what is left (over-counting only delays a job).
        ({"a": 4, "b": 4}, [Claim(1, 6)], {"a": 0, "b": 2}),
        # Larger pods are placed first, so smaller ones fill the gaps.
        ({"a": 8, "b": 4}, [Claim(1, 4), Claim(1, 8)], {"a": 0, "b": 0}),
        ({"a": 8}, [Claim(3, 8)], {"a": 0}),
    ],
)
def test_reserve(free: dict[str, int], claims: list[Claim], left: dict[str, int]) -> None:
    assert reserve(free, claims) == left


def test_unbound_pods_of_other_workloads_are_claims_and_shardwise_pods_are_not() -> None:
    foreign = pod("", 4)
    del foreign["spec"]["nodeName"]
    ours = pod("", 8, job="other")
    del ours["spec"]["nodeName"]
    bound = pod("n1", 2)
    done = pod("", 8, phase="Succeeded")
    selective = pod("", 8)
    del selective["spec"]["nodeName"]
    selective["spec"]["nodeSelector"] = {"pool": "y"}
    nodes = [node("a", labels={"pool": "x"}), node("b", labels={"pool": "y"})]
    claims = unbound_pod_claims(
        [foreign, ours, bound, done, selective],
        nodes,
        gpu_resource="nvidia.com/gpu",
        skip_label="shardwise.dev/job-name",
    )
    # A pod with a nodeSelector claims only among its nodes (none: it can never bind).
    assert claims == [Claim(1, 4), Claim(1, 8, nodes=frozenset({"b"}))]


def test_the_inventory_subtracts_claims_and_places_them_over_every_gpu_node() -> None:
    nodes = [
        node("a", labels={"pool": "x"}),
        node("b", labels={"pool": "y"}),
        node("c", labels={"pool": "y"}),
    ]
    # The claim may only land in pool y: a job asking for pool x still sees its node whole.
    claim = Claim(1, 8, nodes=frozenset({"b", "c"}))
    assert [(n.name, n.free) for n in inv(nodes, claims=[claim], node_selector={"pool": "x"})] == [("a", 8)]
    assert sorted((n.name, n.free) for n in inv(nodes, claims=[claim], node_selector={"pool": "y"})) == [
        ("b", 0),
        ("c", 8),
    ]


@pytest.mark.parametrize(
    ("pods_of_other", "expected"),
    [
        ([], [Claim(2, 8, nodes=frozenset({"a", "b", "c", "d"}))]),  # planned, no pod created yet
        (["a"], [Claim(1, 8, nodes=frozenset({"a", "b", "c", "d"}), avoid=frozenset({"a"}))]),  # one bound
        (["a", "b"], []),  # all bound: the inventory counts them itself
    ],
)
def test_a_planned_job_claims_its_pods_not_bound_yet(pods_of_other: list[str], expected: list[Claim]) -> None:
    nodes = [node(n) for n in "abcd"]
    pods = [pod(n, 8, job="other") for n in pods_of_other]
    jobs = [job("other", layout=TWO_BY_EIGHT), job("me")]
    assert plan_claims(jobs, nodes, pods, gpu_resource="nvidia.com/gpu", skip=("ml", "me")) == expected


@pytest.mark.parametrize(
    ("other", "holds"),
    [
        (job("o", layout=TWO_BY_EIGHT), True),
        (job("o"), False),
        (job("o", layout=TWO_BY_EIGHT, finished=True), False),
        (job("o", layout=TWO_BY_EIGHT, suspend=True), False),
    ],
)
def test_holds_plan(other: dict[str, Any], holds: bool) -> None:
    assert holds_plan(other) is holds


@pytest.mark.parametrize(
    ("other", "waiting"),
    [
        (job("o"), True),  # not passed yet: keeps its place
        (job("o", reason="InsufficientGpus"), True),
        (job("o", reason="Replanning"), True),
        (job("o", reason="InsufficientGpuMemory"), False),  # waits for a spec change, not for GPUs
        (job("o", layout=TWO_BY_EIGHT), False),
        (job("o", suspend=True), False),
        (job("o", reason="InsufficientGpus", finished=True), False),
    ],
)
def test_waiting_for_gpus(other: dict[str, Any], waiting: bool) -> None:
    assert waiting_for_gpus(other) is waiting


def test_queue_order_is_priority_then_creation_then_name() -> None:
    old = job("b", "2026-12-07T10:00:00Z")
    new = job("a", "2026-12-07T10:00:05Z")
    assert queue_order(old, 0) < queue_order(new, 0)
    assert queue_order(new, 100) < queue_order(old, 0)
    assert queue_order(job("a"), 0) < queue_order(job("b"), 0)


def test_ahead_in_queue() -> None:
    nodes = [node(n, labels={"pool": n[0]}) for n in ("x1", "x2", "y1", "y2")]
    values = {"high": 1000}

    def priority(j: Any) -> int:
        return values.get(j["spec"]["template"]["spec"].get("priorityClassName", ""), 0)

    me = job("me", "2026-12-07T10:00:10Z", pool="x")
    jobs = [
        me,
        job("older", "2026-12-07T10:00:00Z", pool="x", reason="InsufficientGpus"),
        job("first", "2026-12-07T09:00:00Z", pool="x"),
        job("newer", "2026-12-07T10:00:20Z", pool="x", reason="InsufficientGpus"),
        job("urgent", "2026-12-07T10:00:30Z", pool="x", priority_class="high"),
        job("elsewhere", "2026-12-07T09:00:00Z", pool="y", reason="InsufficientGpus"),
        job("running", "2026-12-07T09:00:00Z", pool="x", layout=TWO_BY_EIGHT),
        job("too-big", "2026-12-07T09:00:00Z", pool="x", reason="InsufficientGpuMemory"),
        # Asks for more nodes than its pool has: waits for nodes, not in the line.
        job("huge", "2026-12-07T09:00:00Z", pool="x", reason="InsufficientGpus"),
    ]
    jobs[-1]["spec"]["resources"]["nodes"] = 8
    assert ahead_in_queue(me, jobs, nodes, priority) == [("ml", "urgent"), ("ml", "first"), ("ml", "older")]
    assert ahead_in_queue(jobs[2], jobs, nodes, priority) == [("ml", "urgent")]
