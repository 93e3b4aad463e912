"""Job lifecycle against the real control plane: gang restarts, exit codes, disruptions, suspend,
deadline, TTL, gang scheduling timeout and re-planning after a lost node.

Pod failures are injected the way a kubelet reports them: KWOK ends a pod with the exit code a
test annotates (hack/kwok-stages.yaml), or the test patches the pod's status.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.jobs import Kubectl, condition, condition_is, job_manifest, wait_for
from tests.operator_process import OperatorProcess

pytestmark = pytest.mark.integration

TIMEOUT = 90


def small_job(name: str, namespace: str, **run_policy: Any) -> dict[str, Any]:
    return job_manifest(name, namespace, resources={"nodes": 1, "gpusPerNode": 2}, runPolicy=run_policy)


def set_suspend(kubectl: Kubectl, namespace: str, name: str, suspend: bool) -> None:
    patch = json.dumps({"spec": {"runPolicy": {"suspend": suspend}}})
    kubectl("patch", "ptj", name, "-n", namespace, "--type=merge", "-p", patch)


def running_pod(kubectl: Kubectl, namespace: str, name: str, attempt: int) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        for pod in kubectl.pods(namespace, name):
            labels = pod["metadata"]["labels"]
            if (
                labels.get("shardwise.dev/attempt") == str(attempt)
                and pod["status"].get("phase") == "Running"
            ):
                return dict(pod)
        return None

    return dict(wait_for(f"{name} attempt {attempt} running", probe, timeout=TIMEOUT))


def test_retryable_failures_restart_the_gang_until_the_budget_is_spent(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(small_job("retry", namespace, maxRestarts=2))
    for attempt in range(3):
        pod = running_pod(kubectl, namespace, "retry", attempt)
        uid = kubectl.job(namespace, "retry")["metadata"]["uid"]
        assert f"--rdzv-id={uid}-{attempt}" in pod["spec"]["containers"][0]["command"]
        kubectl.exit_pod(namespace, pod["metadata"]["name"], 137, "OOMKilled")
        if attempt < 2:
            job = wait_for(
                f"restart {attempt + 1}",
                lambda a=attempt: (
                    (j := kubectl.job(namespace, "retry"))["status"].get("restarts") == a + 1 and j
                ),
                timeout=TIMEOUT,
            )
            assert job["status"]["attempt"] == attempt + 1
    job = wait_for(
        "Failed", lambda: condition_is(j := kubectl.job(namespace, "retry"), "Failed", "True") and j
    )
    failed = condition(job, "Failed")
    assert failed is not None
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "code 137" in failed["message"]
    assert job["status"]["restarts"] == 2
    restarts = [e for e in kubectl.events(namespace, "retry") if e["reason"] == "Restarting"]
    assert len(restarts) == 2


def test_a_permanent_exit_code_fails_at_once_and_listed_codes_are_retried(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(small_job("perm", namespace, maxRestarts=3))
    pod = running_pod(kubectl, namespace, "perm", 0)
    kubectl.exit_pod(namespace, pod["metadata"]["name"], 2)
    job = wait_for(
        "Failed", lambda: condition_is(j := kubectl.job(namespace, "perm"), "Failed", "True") and j
    )
    failed = condition(job, "Failed")
    assert failed is not None
    assert failed["reason"] == "TrainerExitedWithError"
    assert "perm-node-0" in failed["message"]
    assert "code 2" in failed["message"]
    assert job["status"].get("restarts", 0) == 0

    kubectl.apply(small_job("listed", namespace, maxRestarts=3, retryableExitCodes=[1]))
    pod = running_pod(kubectl, namespace, "listed", 0)
    kubectl.exit_pod(namespace, pod["metadata"]["name"], 1)
    running_pod(kubectl, namespace, "listed", 1)
    assert kubectl.job(namespace, "listed")["status"]["restarts"] == 1


def test_a_disruption_restarts_without_spending_the_budget(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(small_job("evicted", namespace, maxRestarts=0))
    pod = running_pod(kubectl, namespace, "evicted", 0)
    status = {
        "status": {
            "conditions": [
                *pod["status"].get("conditions", []),
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "EvictionByEvictionAPI",
                    "message": "Eviction API: evicting",
                },
            ]
        }
    }
    kubectl(
        "patch", "pod", pod["metadata"]["name"], "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps(status),
    )  # fmt: skip
    running_pod(kubectl, namespace, "evicted", 1)
    job = kubectl.job(namespace, "evicted")
    assert job["status"].get("restarts", 0) == 0
    assert not condition_is(job, "Failed", "True")


def test_suspend_deletes_the_pods_and_resume_starts_a_fresh_attempt(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(small_job("pause", namespace))
    running_pod(kubectl, namespace, "pause", 0)
    set_suspend(kubectl, namespace, "pause", True)
    wait_for("pods deleted", lambda: not kubectl.pods(namespace, "pause"), timeout=TIMEOUT)
    job = wait_for(
        "Suspended", lambda: condition_is(j := kubectl.job(namespace, "pause"), "Suspended", "True") and j
    )
    assert job["status"]["phase"] == "Suspended"
    set_suspend(kubectl, namespace, "pause", False)
    running_pod(kubectl, namespace, "pause", 1)
    job = kubectl.job(namespace, "pause")
    assert condition_is(job, "Suspended", "False", "Resumed")
    assert job["status"].get("restarts", 0) == 0


def test_active_deadline_fails_the_job_and_frees_its_gpus(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(small_job("late", namespace, activeDeadlineSeconds=5))
    running_pod(kubectl, namespace, "late", 0)
    job = wait_for(
        "DeadlineExceeded",
        lambda: condition_is(j := kubectl.job(namespace, "late"), "Failed", "True", "DeadlineExceeded") and j,
        timeout=TIMEOUT,
    )
    assert job["status"]["phase"] == "Failed"
    wait_for(
        "running pods deleted",
        lambda: all(p["metadata"].get("deletionTimestamp") for p in kubectl.pods(namespace, "late")),
        timeout=TIMEOUT,
    )


def test_a_finished_job_is_deleted_after_its_ttl(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(small_job("short", namespace, ttlSecondsAfterFinished=2))
    pod = running_pod(kubectl, namespace, "short", 0)
    kubectl.exit_pod(namespace, pod["metadata"]["name"], 0)
    wait_for(
        "job deleted",
        lambda: kubectl.try_json("get", "ptj", "short", "-n", namespace) is None,
        timeout=TIMEOUT,
    )


def test_a_gang_that_cannot_be_scheduled_is_released_and_retried(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    manifest = small_job("stuck", namespace, scheduleTimeoutSeconds=3)
    # The planner sees free GPUs, but no node has this much CPU: the scheduler keeps the pod Pending.
    manifest["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": {"cpu": "100000"}}
    kubectl.apply(manifest)
    job = wait_for(
        "GangScheduleTimeout",
        lambda: (
            condition_is(j := kubectl.job(namespace, "stuck"), "Running", "False", "GangScheduleTimeout")
            and j
        ),
        timeout=TIMEOUT,
    )
    running = condition(job, "Running")
    assert running is not None
    assert "stuck-node-0" in running["message"]
    assert job["status"]["scheduleFailures"] >= 1
    assert job["status"].get("restarts", 0) == 0
    wait_for(
        "a retried attempt",
        lambda: any(
            p["metadata"]["labels"]["shardwise.dev/attempt"] != "0" for p in kubectl.pods(namespace, "stuck")
        ),
        timeout=TIMEOUT,
    )


def test_losing_a_node_replans_the_job_for_what_is_left(
    cluster: Any, kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    product = "NVIDIA-L40S"
    names = cluster.add_gpu_nodes(
        2, gpus_per_node=4, gpu_product=product, gpu_memory_mib=46068, prefix="l40s"
    )
    kubectl.apply(
        job_manifest(
            "shrink",
            namespace,
            resources={"nodes": 2, "gpusPerNode": 4, "gpuProduct": product},
            runPolicy={"replanOnNodeLoss": True},
        )
    )

    def both_running() -> list[dict[str, Any]] | None:
        pods = kubectl.pods(namespace, "shrink")
        return pods if len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods) else None

    pods = wait_for("two pods running", both_running, timeout=TIMEOUT)
    assert {p["spec"]["nodeName"] for p in pods} == set(names)
    kubectl("delete", "node", pods[1]["spec"]["nodeName"])

    job = wait_for(
        "re-planned on one node",
        lambda: (
            ((j := kubectl.job(namespace, "shrink"))["status"].get("layout") or {}).get("nodes") == 1 and j
        ),
        timeout=TIMEOUT,
    )
    assert job["status"].get("restarts", 0) == 0
    assert job["status"]["attempt"] >= 1
    assert any(e["reason"] == "Replanned" for e in kubectl.events(namespace, "shrink"))
    pod = running_pod(kubectl, namespace, "shrink", job["status"]["attempt"])
    assert pod["spec"]["nodeName"] == pods[0]["spec"]["nodeName"]
    assert "--nnodes=1" in pod["spec"]["containers"][0]["command"]


def test_in_a_mixed_cluster_the_pods_land_only_on_the_planned_gpu_product(
    cluster: Any, kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    """One H100-80GB and three A100-40GB nodes in one pool: the plan assumes the H100 (the roomier
    GPU) and the pod requires that product, so the scheduler cannot put it on an A100."""
    pool = namespace
    h100 = cluster.add_gpu_nodes(
        1, gpus_per_node=8, gpu_product="NVIDIA-H100-80GB-HBM3", gpu_memory_mib=81559, prefix=f"mix-h-{pool}"
    )
    a100 = cluster.add_gpu_nodes(
        3, gpus_per_node=8, gpu_product="NVIDIA-A100-SXM4-40GB", gpu_memory_mib=40960, prefix=f"mix-a-{pool}"
    )
    kubectl("label", "node", *h100, *a100, f"pool={pool}")
    kubectl.apply(
        job_manifest(
            "mixed", namespace, resources={"nodes": 1, "gpusPerNode": 8, "nodeSelector": {"pool": pool}}
        )
    )
    pod = running_pod(kubectl, namespace, "mixed", 0)
    job = kubectl.job(namespace, "mixed")
    assert job["status"]["layout"]["gpuProduct"] == "NVIDIA-H100-80GB-HBM3"
    assert pod["spec"]["nodeName"] in h100, (pod["spec"]["nodeName"], h100)
    [term] = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]} in term[
        "matchExpressions"
    ]
    kubectl("delete", "node", *h100, *a100, "--wait=false")


def test_with_nvlink_domains_labelled_the_gang_shares_one_domain(
    cluster: Any, kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    """Four nodes in two NVLink domains (nvidia.com/gpu.clique): a 2-node job's pods prefer one
    domain, and the real scheduler puts both there."""
    pool = namespace
    nodes = cluster.add_gpu_nodes(4, gpus_per_node=8, prefix=f"clique-{pool}")
    kubectl("label", "node", *nodes, f"pool={pool}")
    kubectl("label", "node", *nodes[:2], "nvidia.com/gpu.clique=domain-a.0")
    kubectl("label", "node", *nodes[2:], "nvidia.com/gpu.clique=domain-b.0")
    kubectl.apply(
        job_manifest(
            "nvl", namespace, resources={"nodes": 2, "gpusPerNode": 8, "nodeSelector": {"pool": pool}}
        )
    )
    running_pod(kubectl, namespace, "nvl", 0)
    pods = wait_for(
        "both pods bound",
        lambda: (ps := kubectl.pods(namespace, "nvl")) and all(p["spec"].get("nodeName") for p in ps) and ps,
        timeout=TIMEOUT,
    )
    for pod in pods:
        [term] = pod["spec"]["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "nvidia.com/gpu.clique"
    domains = {
        kubectl.json("get", "node", p["spec"]["nodeName"])["metadata"]["labels"]["nvidia.com/gpu.clique"]
        for p in pods
    }
    assert len(domains) == 1, domains
    kubectl("delete", "node", *nodes, "--wait=false")
