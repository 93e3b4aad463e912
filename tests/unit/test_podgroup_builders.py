"""Table tests for the pure gang-scheduling builders: the PodGroup (coscheduling / Volcano) and pods."""

from __future__ import annotations

from typing import Any

import pytest

from shardwise.resources import podgroup
from shardwise.resources.pods import PodShape, build_pod


def job(scheduling: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "resources": {"nodes": 4, "gpusPerNode": 8},
        "template": {"spec": {"containers": [{"name": "trainer", "image": "img"}]}},
    }
    if scheduling is not None:
        spec["scheduling"] = scheduling
    return {
        "apiVersion": "shardwise.dev/v1alpha1",
        "kind": "ParallelTrainingJob",
        "metadata": {"name": "llama", "namespace": "team", "uid": "u-1"},
        "spec": spec,
    }


@pytest.mark.parametrize(
    ("scheduling", "expected"),
    [
        (None, None),
        ({"schedulerName": "custom"}, None),
        ({"gang": {"kind": "Coscheduling"}}, ("Coscheduling", "scheduler-plugins-scheduler", 300, None)),
        (
            {"schedulerName": "sp", "gang": {"kind": "Coscheduling", "scheduleTimeoutSeconds": 60}},
            ("Coscheduling", "sp", 60, None),
        ),
        ({"gang": {"kind": "Volcano", "queue": "research"}}, ("Volcano", "volcano", 300, "research")),
    ],
)
def test_gang_spec(scheduling: dict[str, Any] | None, expected: tuple[Any, ...] | None) -> None:
    got = podgroup.gang_spec(job(scheduling))
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert (got.kind, got.scheduler_name, got.schedule_timeout_seconds, got.queue) == expected


def test_coscheduling_podgroup_min_member_is_every_pod() -> None:
    j = job({"gang": {"kind": "Coscheduling", "scheduleTimeoutSeconds": 120}})
    gang = podgroup.gang_spec(j)
    assert gang is not None
    pg = podgroup.build_podgroup(j, gang, 4, {"nvidia.com/gpu": "32"})
    assert pg["apiVersion"] == "scheduling.x-k8s.io/v1alpha1" and pg["kind"] == "PodGroup"
    assert pg["metadata"]["name"] == "llama" and pg["metadata"]["namespace"] == "team"
    assert pg["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert pg["spec"] == {
        "minMember": 4,
        "minResources": {"nvidia.com/gpu": "32"},
        "scheduleTimeoutSeconds": 120,
    }


def test_volcano_podgroup_has_its_queue_and_no_coscheduling_fields() -> None:
    j = job({"gang": {"kind": "Volcano", "queue": "research"}})
    gang = podgroup.gang_spec(j)
    assert gang is not None
    pg = podgroup.build_podgroup(j, gang, 4, {"nvidia.com/gpu": "32"})
    assert pg["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    assert pg["spec"] == {"minMember": 4, "minResources": {"nvidia.com/gpu": "32"}, "queue": "research"}


@pytest.mark.parametrize(
    ("kind", "label", "annotation"),
    [
        ("Coscheduling", {"scheduling.x-k8s.io/pod-group": "llama"}, {}),
        ("Volcano", {}, {"scheduling.k8s.io/group-name": "llama"}),
    ],
)
def test_pods_join_the_group(kind: str, label: dict[str, str], annotation: dict[str, str]) -> None:
    j = job({"schedulerName": "gang-sched", "gang": {"kind": kind}})
    gang = podgroup.gang_spec(j)
    assert gang is not None
    pod = podgroup.with_gang(build_pod(j, PodShape(nodes=4, gpus_per_node=8, attempt=0), 2), "llama", gang)
    assert pod["spec"]["schedulerName"] == "gang-sched"
    labels = pod["metadata"].get("labels") or {}
    assert {k: v for k, v in labels.items() if k == "scheduling.x-k8s.io/pod-group"} == label
    assert (pod["metadata"].get("annotations") or {}) == annotation
