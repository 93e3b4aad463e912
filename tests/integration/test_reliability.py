"""Operator reliability against the real control plane (issue 20): each test reproduces one defect.

Resize after suspend, training changes between attempts, pods the API server refuses, metric
series of deleted jobs, hostile stats pages, pods stuck Terminating on a lost node, and Events
whose POST timed out. The operator is a real subprocess of this module (short backoff, liveness
endpoint on, a stats byte cap the tests exercise); nothing of the Kubernetes API is mocked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from tests.jobs import Kubectl, condition, condition_is, job_manifest, wait_for
from tests.operator_process import OperatorProcess, free_port, running_operator

pytestmark = pytest.mark.integration

TIMEOUT = 90


@pytest.fixture(scope="module")
def liveness_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def operator(
    cluster: Any, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory, liveness_port: int
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    args = ["--restart-backoff-seconds", "1", "--liveness-port", str(liveness_port)]
    with running_operator(cluster.kubeconfig, log, *args) as op:
        yield op
    print(op.log()[-20000:])


def small_job(name: str, namespace: str, nodes: int = 1, gpus: int = 2, **spec: Any) -> dict[str, Any]:
    return job_manifest(name, namespace, resources={"nodes": nodes, "gpusPerNode": gpus}, **spec)


def patch_spec(kubectl: Kubectl, namespace: str, name: str, spec: dict[str, Any]) -> None:
    kubectl("patch", "ptj", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": spec}))


def attempt_pods(kubectl: Kubectl, namespace: str, name: str, attempt: int) -> list[dict[str, Any]]:
    return [
        p
        for p in kubectl.pods(namespace, name)
        if p["metadata"]["labels"].get("shardwise.dev/attempt") == str(attempt)
        and not p["metadata"].get("deletionTimestamp")
    ]


def running(kubectl: Kubectl, namespace: str, name: str, attempt: int, count: int) -> list[dict[str, Any]]:
    def probe() -> list[dict[str, Any]] | None:
        pods = attempt_pods(kubectl, namespace, name, attempt)
        ok = len(pods) == count and all(p["status"].get("phase") == "Running" for p in pods)
        return pods if ok else None

    return list(wait_for(f"{name} attempt {attempt}: {count} pod(s) running", probe, timeout=TIMEOUT))


def layout_document(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    cm = kubectl.json("get", "configmap", f"{name}-layout", "-n", namespace)
    return dict(json.loads(cm["data"]["layout.json"]))


def assert_one_plan(kubectl: Kubectl, namespace: str, name: str, global_batch: int) -> None:
    """The ConfigMap's layout.json and status.layout are the same plan, of the current spec."""
    job = kubectl.job(namespace, name)
    status, doc = job["status"]["layout"], layout_document(kubectl, namespace, name)
    lay = doc["layout"]
    assert doc["training"]["global_batch_size"] == global_batch
    assert lay["micro_batch"] * lay["grad_accum"] * lay["dp"] == global_batch
    assert (status["microBatchSize"], status["gradientAccumulation"], status["data"]) == (
        lay["micro_batch"],
        lay["grad_accum"],
        lay["dp"],
    )
    planned = condition(job, "Planned")
    assert planned is not None and planned["observedGeneration"] == job["metadata"]["generation"]


# -- 1. resize after suspend ---------------------------------------------------------------------


def test_a_job_resized_while_suspended_is_replanned_on_resume(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(small_job("resize", namespace, nodes=1, gpus=2))
    running(kubectl, namespace, "resize", 0, 1)
    patch_spec(kubectl, namespace, "resize", {"runPolicy": {"suspend": True}})
    wait_for(
        "Suspended",
        lambda: condition_is(kubectl.job(namespace, "resize"), "Suspended", "True"),
        timeout=TIMEOUT,
    )
    # Allowed by the CRD while Suspended=True: the way to resize a started job.
    patch_spec(kubectl, namespace, "resize", {"resources": {"nodes": 2, "gpusPerNode": 4}})
    patch_spec(kubectl, namespace, "resize", {"runPolicy": {"suspend": False}})

    pods = running(kubectl, namespace, "resize", 1, 2)
    assert [p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for p in pods] == ["4", "4"]
    job = kubectl.job(namespace, "resize")
    assert (job["status"]["layout"]["nodes"], job["status"]["layout"]["gpusPerNode"]) == (2, 4)
    planned = condition(job, "Planned")
    assert planned is not None
    assert (
        planned["observedGeneration"] == job["metadata"]["generation"] == job["status"]["observedGeneration"]
    )
    assert layout_document(kubectl, namespace, "resize")["layout"]["nodes"] == 2


# -- 2. training changes between attempts --------------------------------------------------------


def test_a_training_change_reaches_the_next_attempt_from_one_plan(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    training = {"method": "full", "precision": "bf16", "sequenceLength": 4096, "globalBatchSize": 16}
    kubectl.apply(small_job("retune", namespace, training=training))
    pods = running(kubectl, namespace, "retune", 0, 1)
    assert_one_plan(kubectl, namespace, "retune", 16)

    for attempt, batch in ((1, 64), (2, 128)):
        patch_spec(kubectl, namespace, "retune", {"training": {"globalBatchSize": batch}})
        kubectl.exit_pod(namespace, pods[0]["metadata"]["name"], 137, "OOMKilled")  # a retryable restart
        pods = running(kubectl, namespace, "retune", attempt, 1)
        assert_one_plan(kubectl, namespace, "retune", batch)

    # Children deleted under the running attempt come back while it runs, from the same plan.
    kubectl("delete", "configmap", "retune-layout", "-n", namespace)
    kubectl("delete", "service", "retune", "-n", namespace)
    wait_for(
        "ConfigMap and Service restored",
        lambda: (
            kubectl.try_json("get", "configmap", "retune-layout", "-n", namespace)
            and kubectl.try_json("get", "service", "retune", "-n", namespace)
        ),
        timeout=30,
    )
    assert_one_plan(kubectl, namespace, "retune", 128)
    assert kubectl.job(namespace, "retune")["status"]["attempt"] == 2  # restored, not restarted
