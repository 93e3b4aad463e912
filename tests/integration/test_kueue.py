"""Real Kueue admits, queues and preempts ParallelTrainingJobs through the operator's Workloads."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from tests.jobs import Kubectl, condition, condition_is, install_crd, job_manifest, wait_for
from tests.operator_process import OperatorProcess, running_operator

from cluster import (
    ClusterError,
    ClusterUnavailableError,
    LocalCluster,
    binaries_built,
    build_binaries,
    build_kueue,
    in_ci,
    kueue_built,
)

pytestmark = [pytest.mark.integration, pytest.mark.kueue]

REPO_CRD = "crds/paralleltrainingjobs.shardwise.dev.yaml"
FLAVOR = "shardwise-h100"
FLAVOR_LABEL = "shardwise.dev/local-cluster"


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"Kueue unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"Kueue unavailable: {reason}")


@pytest.fixture(scope="module")
def kueue_cluster() -> Iterator[LocalCluster]:
    """Its own control plane (2 nodes x 8 GPUs) with Kueue: no other module's jobs hold its GPUs."""
    if not (binaries_built() and kueue_built()):
        if not in_ci() and os.environ.get("SHARDWISE_BUILD_CLUSTER") != "1":
            _unavailable("not built; run `hack/local-cluster build && hack/local-cluster build --kueue`")
        try:
            build_binaries()
            build_kueue()
        except ClusterUnavailableError as err:
            _unavailable(str(err))
    local = LocalCluster(kueue=True)
    try:
        local.start()
    except ClusterError as err:
        pytest.fail(f"local control plane with Kueue failed to start: {err}", pytrace=False)
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def kk(kueue_cluster: LocalCluster) -> Kubectl:
    k = Kubectl(kueue_cluster)
    install_crd(k, REPO_CRD)
    k.apply(
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": FLAVOR},
            "spec": {"nodeLabels": {FLAVOR_LABEL: "true"}},
        }
    )
    return k


@pytest.fixture(scope="module")
def kueue_operator(
    kueue_cluster: LocalCluster, kk: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with running_operator(kueue_cluster.kubeconfig, log, "--restart-backoff-seconds", "1") as op:
        yield op
    print(op.log()[-20000:])


def _queue(kk: Kubectl, gpus: int) -> str:
    """A namespace with a LocalQueue on a ClusterQueue of `gpus` GPUs (preempting lower priority)."""
    ns = f"k-{uuid.uuid4().hex[:8]}"
    kk("create", "namespace", ns)
    kk.apply(
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": f"cq-{ns}"},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": FLAVOR,
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "1000"},
                                    {"name": "memory", "nominalQuota": "10Ti"},
                                    {"name": "nvidia.com/gpu", "nominalQuota": str(gpus)},
                                ],
                            }
                        ],
                    }
                ],
            },
        }
    )
    kk.apply(
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": "q", "namespace": ns},
            "spec": {"clusterQueue": f"cq-{ns}"},
        }
    )
    return ns


def _submit(kk: Kubectl, ns: str, name: str, priority: str | None = None) -> None:
    job = job_manifest(name, ns, resources={"nodes": 1, "gpusPerNode": 8})
    job["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "q"}
    if priority:
        job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] = priority
    kk.apply(job)


def _running(kk: Kubectl, ns: str, name: str) -> bool:
    pods = kk.pods(ns, name)
    return bool(pods) and all(p["status"].get("phase") == "Running" for p in pods)


def _finish(kk: Kubectl, ns: str, name: str) -> None:
    for pod in kk.pods(ns, name):
        kk.exit_pod(ns, pod["metadata"]["name"], 0)
    wait_for(f"{name} Succeeded", lambda: kk.job(ns, name)["status"].get("phase") == "Succeeded", 90)


def _cleanup(kk: Kubectl, ns: str) -> None:
    kk("delete", "ptj", "--all", "-n", ns, "--wait=false")
    wait_for("the namespace's pods gone", lambda: not kk.json("get", "pods", "-n", ns)["items"], 90)
    kk("delete", "namespace", ns, "--wait=false")


def test_a_full_queue_holds_the_third_job_with_kueues_reason_until_one_finishes(
    kk: Kubectl, kueue_operator: OperatorProcess
) -> None:
    ns = _queue(kk, gpus=16)
    submitted = time.monotonic()
    for name in ("j1", "j2", "j3"):
        _submit(kk, ns, name)
        time.sleep(1.0)  # Kueue orders equal priorities by creation time

    def admitted() -> list[str]:
        return [n for n in ("j1", "j2", "j3") if condition_is(kk.job(ns, n), "Admitted", "True")]

    wait_for("two jobs admitted", lambda: len(admitted()) == 2, 120)
    latency = time.monotonic() - submitted
    first, second = admitted()
    waiting = ({"j1", "j2", "j3"} - {first, second}).pop()
    wait_for("the admitted jobs running", lambda: _running(kk, ns, first) and _running(kk, ns, second), 90)
    print(f"admission of two jobs (plus their pods' start) took {latency:.1f}s after the first submit")

    held = wait_for(
        "the third queued with Kueue's reason", lambda: condition(kk.job(ns, waiting), "Admitted"), 60
    )
    assert held["status"] == "False"
    assert "insufficient" in held["message"] and "nvidia.com/gpu" in held["message"], held
    job = kk.job(ns, waiting)
    assert job["status"]["phase"] == "Queued"
    assert condition_is(job, "Suspended", "True", "QueuedByKueue")
    assert kk.pods(ns, waiting) == []
    # The running jobs' pods carry the admitted flavor's node labels.
    pod = kk.pods(ns, first)[0]
    assert pod["spec"]["nodeSelector"][FLAVOR_LABEL] == "true"
    workload = kk.json("get", "workloads.kueue.x-k8s.io", f"ptj-{first}", "-n", ns)
    assert workload["spec"]["podSets"][0]["count"] == 1
    assert workload["metadata"]["ownerReferences"][0]["name"] == first
    requests = workload["spec"]["podSets"][0]["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert requests["nvidia.com/gpu"] == "8"

    _finish(kk, ns, first)
    wait_for(f"{waiting} admitted and running once {first} finished", lambda: _running(kk, ns, waiting), 120)
    job = kk.job(ns, waiting)
    assert condition_is(job, "Admitted", "True") and condition_is(job, "Suspended", "False")
    assert job["status"].get("restarts", 0) == 0
    _cleanup(kk, ns)


def test_a_higher_priority_job_preempts_a_lower_one_which_resumes_without_spending_restarts(
    kk: Kubectl, kueue_operator: OperatorProcess
) -> None:
    for name, value in (("sw-low", 100), ("sw-high", 1000)):
        kk.apply(
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": name},
                "value": value,
            }
        )
    ns = _queue(kk, gpus=16)
    _submit(kk, ns, "low-a", "sw-low")
    _submit(kk, ns, "low-b", "sw-low")
    wait_for("both low jobs running", lambda: _running(kk, ns, "low-a") and _running(kk, ns, "low-b"), 120)
    _submit(kk, ns, "high", "sw-high")

    def victim() -> str | None:
        for name in ("low-a", "low-b"):
            if condition_is(kk.job(ns, name), "Suspended", "True", "EvictedByKueue"):
                return name
        return None

    lost = wait_for("one low job evicted", victim, 120)
    wait_for("the high job running", lambda: _running(kk, ns, "high"), 120)
    job = kk.job(ns, lost)
    assert job["status"]["phase"] == "Suspended"
    assert "Preempted" in condition(job, "Admitted")["reason"] + condition(job, "Admitted")["message"]
    assert job["status"].get("restarts", 0) == 0
    attempt = int(job["status"].get("attempt") or 0)
    wait_for(f"{lost}'s pods deleted", lambda: kk.pods(ns, lost) == [], 60)

    _finish(kk, ns, "high")
    wait_for(f"{lost} resumed", lambda: _running(kk, ns, lost), 120)
    job: dict[str, Any] = kk.job(ns, lost)
    assert job["status"].get("restarts", 0) == 0
    assert int(job["status"]["attempt"]) == attempt + 1
    assert condition_is(job, "Admitted", "True")
    _cleanup(kk, ns)
