"""Table tests for the pure Kueue contract: the Workload, reading admission, releasing, finishing."""

from __future__ import annotations

from typing import Any

import pytest

from shardwise.resources import kueue
from shardwise.resources.pods import PodShape, build_pod


def job(labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "shardwise.dev/v1alpha1",
        "kind": "ParallelTrainingJob",
        "metadata": {
            "name": "llama",
            "namespace": "team",
            "uid": "u-1",
            "labels": {"kueue.x-k8s.io/queue-name": "gpu", **(labels or {})},
        },
        "spec": {
            "resources": {"nodes": 2, "gpusPerNode": 8, "nodeSelector": {"pool": "a"}},
            "template": {
                "spec": {
                    "containers": [
                        {"name": "trainer", "image": "img", "resources": {"requests": {"cpu": "8"}}}
                    ]
                }
            },
        },
    }


def workload(conditions: list[dict[str, Any]], admission: dict[str, Any] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": conditions}
    if admission is not None:
        status["admission"] = admission
    return {"metadata": {"name": "ptj-llama", "generation": 3}, "status": status}


def cond(ctype: str, status: str, reason: str = "R", message: str = "m") -> dict[str, Any]:
    return {"type": ctype, "status": status, "reason": reason, "message": message, "lastTransitionTime": "t0"}


ADMISSION = {
    "clusterQueue": "cq",
    "podSetAssignments": [{"name": "main", "flavors": {"nvidia.com/gpu": "h100", "cpu": "h100"}, "count": 2}],
}


def test_workload_has_one_pod_set_per_node_with_the_pods_requests_and_an_owner() -> None:
    j = job()
    pod = build_pod(j, PodShape(nodes=2, gpus_per_node=8, attempt=0), 0)
    wl = kueue.build_workload(j, pod, 2, priority=1000, priority_class="high")
    assert wl["apiVersion"] == "kueue.x-k8s.io/v1beta2" and wl["kind"] == "Workload"
    assert wl["metadata"]["name"] == "ptj-llama" and wl["metadata"]["namespace"] == "team"
    assert wl["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert wl["metadata"]["ownerReferences"][0]["controller"] is True
    assert wl["spec"]["queueName"] == "gpu"
    assert wl["spec"]["priority"] == 1000
    assert wl["spec"]["priorityClassRef"] == {
        "group": "kueue.x-k8s.io",
        "kind": "WorkloadPriorityClass",
        "name": "high",
    }
    (pod_set,) = wl["spec"]["podSets"]
    assert pod_set["name"] == "main" and pod_set["count"] == 2
    spec = pod_set["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["requests"] == {"cpu": "8", "nvidia.com/gpu": "8"}
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert spec["nodeSelector"] == {"pool": "a"}
    # Only what Kueue accounts: no torchrun command, env or volumes.
    assert set(container) == {"name", "image", "resources"}
    assert "volumes" not in spec


def test_workload_without_priority_and_pod_priority_class_source() -> None:
    j = job()
    pod = build_pod(j, PodShape(nodes=1, gpus_per_node=8, attempt=0), 0)
    assert "priority" not in kueue.build_workload(j, pod, 1)["spec"]
    ref = kueue.build_workload(j, pod, 1, priority_class="prod", priority_source=kueue.POD_PRIORITY_SOURCE)[
        "spec"
    ]["priorityClassRef"]
    assert ref == {"group": "scheduling.k8s.io", "kind": "PriorityClass", "name": "prod"}


def test_a_job_without_the_queue_label_has_no_workload() -> None:
    j = job()
    del j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    assert kueue.queue_name(j) is None
    with pytest.raises(ValueError, match="queue-name"):
        kueue.build_workload(j, {"spec": {}}, 1)


@pytest.mark.parametrize(
    ("wl", "state", "reason", "flavors"),
    [
        (workload([]), "Pending", "Pending", {}),
        (
            workload(
                [cond("QuotaReserved", "False", "Pending", "couldn't assign flavors: insufficient quota")]
            ),
            "Pending",
            "Pending",
            {},
        ),
        (workload([cond("QuotaReserved", "True")], ADMISSION), "Pending", "QuotaReserved", {}),
        (
            workload([cond("QuotaReserved", "True"), cond("Admitted", "True")], ADMISSION),
            "Admitted",
            "Admitted",
            {"nvidia.com/gpu": "h100", "cpu": "h100"},
        ),
        (
            workload(
                [
                    cond("QuotaReserved", "True"),
                    cond("Admitted", "True"),
                    cond("Evicted", "True", "Preempted"),
                ],
                ADMISSION,
            ),
            "Evicted",
            "Preempted",
            {},
        ),
        # Admission removed (Kueue cleared it) while Admitted is stale: not admitted.
        (workload([cond("Admitted", "True")]), "Pending", "Pending", {}),
    ],
)
def test_admission_reads_the_workload_status(
    wl: dict[str, Any], state: str, reason: str, flavors: dict[str, str]
) -> None:
    got = kueue.admission(wl)
    assert (got.state, got.reason, got.flavors) == (state, reason, flavors)


def test_pending_message_is_kueues() -> None:
    msg = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu"
    assert kueue.admission(workload([cond("QuotaReserved", "False", "Pending", msg)])).message == msg


def test_flavor_placement_merges_node_labels_and_tolerations() -> None:
    tol = {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}
    flavors = [
        {"spec": {"nodeLabels": {"pool": "h100"}, "tolerations": [tol]}},
        {"spec": {"nodeLabels": {"zone": "z1"}, "tolerations": [tol]}},
        {"spec": {}},
    ]
    selector, tolerations = kueue.flavor_placement(flavors)
    assert selector == {"pool": "h100", "zone": "z1"}
    assert tolerations == [tol]


def test_with_placement_adds_to_the_jobs_own_placement_and_leaves_the_job_alone() -> None:
    j = job()
    tol = {"key": "gpu", "operator": "Exists"}
    placed = kueue.with_placement(j, {"flavor": "h100"}, [tol])
    assert placed["spec"]["resources"]["nodeSelector"] == {"pool": "a", "flavor": "h100"}
    assert placed["spec"]["resources"]["tolerations"] == [tol]
    assert j["spec"]["resources"]["nodeSelector"] == {"pool": "a"}
    assert kueue.with_placement(j, {}, []) is j
    pod = build_pod(placed, PodShape(nodes=2, gpus_per_node=8, attempt=0), 1)
    assert pod["spec"]["nodeSelector"]["flavor"] == "h100"
    assert tol in pod["spec"]["tolerations"]


@pytest.mark.parametrize(
    ("reason", "requeued"),
    [("Preempted", "True"), ("ClusterQueueStopped", "False"), ("NodeFailures", "True")],
)
def test_release_clears_the_admission_as_kueues_job_reconciler_does(reason: str, requeued: str) -> None:
    wl = workload(
        [cond("QuotaReserved", "True"), cond("Admitted", "True"), cond("Evicted", "True", reason, "by cq")],
        ADMISSION,
    )
    status = kueue.release_status(wl, "t1")
    assert status["admission"] is None
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["QuotaReserved"]["status"] == "False" and by_type["QuotaReserved"]["reason"] == "Pending"
    assert by_type["QuotaReserved"]["lastTransitionTime"] == "t1"
    assert by_type["QuotaReserved"]["observedGeneration"] == 3
    assert by_type["Admitted"]["status"] == "False"
    assert by_type["Requeued"]["status"] == requeued
    assert by_type["Evicted"]["status"] == "True"  # Kueue's own condition is left to Kueue


def test_finished_marks_the_workload_once() -> None:
    wl = workload([cond("Admitted", "True")], ADMISSION)
    status = kueue.finished_status(wl, True, "done", "t2")
    (fin,) = [c for c in status["conditions"] if c["type"] == "Finished"]
    assert (fin["status"], fin["reason"]) == ("True", "Succeeded")
    assert not kueue.is_finished(wl)
    assert kueue.is_finished(workload(status["conditions"]))
    failed = kueue.finished_status(wl, False, "boom", "t2")["conditions"][-1]
    assert failed["reason"] == "Failed"


def test_pod_set_count() -> None:
    j = job()
    wl = kueue.build_workload(j, build_pod(j, PodShape(nodes=3, gpus_per_node=8, attempt=0), 0), 3)
    assert kueue.pod_set_count(wl) == 3
    assert kueue.pod_set_count({"spec": {"podSets": [{"name": "other", "count": 2}]}}) is None
