"""The operator against the real local control plane: plan, children, status, events, GC."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.jobs import Kubectl, condition, job_manifest, wait_for
from tests.operator_process import OperatorProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def job_pods(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    return kubectl.pods(namespace, name)


def events_for(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    return kubectl.events(namespace, name)


def wait_not_planned(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    """The job once its Planned condition is False."""
    return wait_for(
        "Planned=False",
        lambda: (
            (j := kubectl.job(namespace, name))
            and (c := condition(j, "Planned"))
            and c["status"] == "False"
            and j
        ),
    )


def test_job_is_planned_and_its_children_follow_the_plan(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(job_manifest("llama", namespace))

    pods = wait_for(
        "two trainer pods", lambda: (p := job_pods(kubectl, namespace, "llama")) and len(p) == 2 and p
    )
    job = kubectl.job(namespace, "llama")
    layout = job["status"]["layout"]
    planned = condition(job, "Planned")
    assert planned is not None
    assert planned["status"] == "True"
    assert (layout["nodes"], layout["gpusPerNode"]) == (2, 8)

    # The same inputs through the offline CLI give the same layout.
    cli = subprocess.run(
        [
            sys.executable, "-m", "shardwise.cli", "plan", "--model", "llama-2-7b", "--nodes", "2",
            "--gpus-per-node", "8", "--gpu", "NVIDIA-H100-80GB-HBM3", "--gpu-memory", "81559MiB",
            "--seq", "4096", "--global-batch", "16", "--method", "full", "--precision", "bf16", "--json",
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    offline = json.loads(cli.stdout)["layout"]
    assert (layout["tensor"], layout["pipeline"], layout["data"], layout["zeroStage"]) == (
        offline["tp"], offline["pp"], offline["dp"], offline["zero_stage"],
    )  # fmt: skip
    assert (layout["microBatchSize"], layout["gradientAccumulation"]) == (
        offline["micro_batch"],
        offline["grad_accum"],
    )
    assert layout["activationCheckpointing"] == offline["checkpointing"]
    assert layout["offload"] == offline["offload"]

    svc = kubectl.json("get", "service", "llama", "-n", namespace)
    assert svc["spec"]["clusterIP"] == "None"
    cm = kubectl.json("get", "configmap", "llama-layout", "-n", namespace)
    doc = json.loads(cm["data"]["layout.json"])
    assert doc["layout"]["tp"] == layout["tensor"]
    assert json.loads(cm["data"]["ds_config.json"]) == doc["deepspeed"]

    for rank, pod in enumerate(pods):
        container = pod["spec"]["containers"][0]
        assert container["command"][:4] == [
            "torchrun",
            "--nnodes=2",
            "--nproc-per-node=8",
            f"--node-rank={rank}",
        ]
        assert "--rdzv-endpoint=llama-node-0.llama:29400" in container["command"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        owner = pod["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("ParallelTrainingJob", "llama", True)

    # The real scheduler binds them to two different KWOK GPU nodes; KWOK runs them.
    def all_running() -> list[dict[str, Any]] | None:
        current = job_pods(kubectl, namespace, "llama")
        return current if current and all(p["status"].get("phase") == "Running" for p in current) else None

    pods = wait_for("pods scheduled and running", all_running)
    assert len({p["spec"]["nodeName"] for p in pods}) == 2
    wait_for(
        "job Running",
        lambda: (c := condition(kubectl.job(namespace, "llama"), "Running")) and c["status"] == "True",
    )

    for pod in pods:
        kubectl("annotate", "pod", pod["metadata"]["name"], "-n", namespace, "kwok.shardwise.dev/exit-code=0")
    job = wait_for(
        "job Succeeded",
        lambda: (j := kubectl.job(namespace, "llama"))["status"].get("phase") == "Succeeded" and j,
    )
    succeeded = condition(job, "Succeeded")
    assert succeeded is not None
    assert succeeded["reason"] == "AllPodsSucceeded"
    assert job["status"]["completionTime"]
    assert job["status"]["observedGeneration"] == job["metadata"]["generation"]
    reasons = {e["reason"] for e in events_for(kubectl, namespace, "llama")}
    assert {"LayoutPlanned", "PodsCreated", "AllPodsRunning", "AllPodsSucceeded"} <= reasons

    # Nothing left to do: the operator stops writing (no hot loop on a finished job).
    version = kubectl.job(namespace, "llama")["metadata"]["resourceVersion"]
    time.sleep(3)
    assert kubectl.job(namespace, "llama")["metadata"]["resourceVersion"] == version


def test_a_failed_pod_fails_the_job_with_the_pod_and_exit_code(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(job_manifest("crash", namespace, resources={"nodes": 1, "gpusPerNode": 8}))
    wait_for(
        "pod running",
        lambda: (p := job_pods(kubectl, namespace, "crash")) and p[0]["status"].get("phase") == "Running",
    )
    kubectl("annotate", "pod", "crash-node-0", "-n", namespace, "kwok.shardwise.dev/exit-code=3")
    job = wait_for(
        "job Failed",
        lambda: (j := kubectl.job(namespace, "crash"))["status"].get("phase") == "Failed" and j,
    )
    failed = condition(job, "Failed")
    assert failed is not None
    assert failed["reason"] == "TrainerExitedWithError"
    assert "crash-node-0" in failed["message"]
    assert "code 3" in failed["message"]
    assert any(
        e["reason"] == "TrainerExitedWithError" and e["type"] == "Warning"
        for e in events_for(kubectl, namespace, "crash")
    )


def test_deleting_the_job_garbage_collects_every_child(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(job_manifest("gone", namespace, resources={"nodes": 1, "gpusPerNode": 4}))
    wait_for("pod", lambda: job_pods(kubectl, namespace, "gone"))
    kubectl("delete", "ptj", "gone", "-n", namespace, "--wait=true", "--timeout=60s")

    def no_children() -> bool:
        return (
            not job_pods(kubectl, namespace, "gone")
            and kubectl.try_json("get", "service", "gone", "-n", namespace) is None
            and kubectl.try_json("get", "configmap", "gone-layout", "-n", namespace) is None
        )

    wait_for("children garbage-collected", no_children, timeout=90)


def test_a_job_that_cannot_fit_gets_a_condition_and_an_event_and_no_pods(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(
        job_manifest(
            "huge",
            namespace,
            model={"preset": "qwen2-72b"},
            training={"method": "full", "precision": "bf16", "sequenceLength": 4096, "offload": "none"},
            resources={"nodes": 1, "gpusPerNode": 8},
        )
    )
    job = wait_not_planned(kubectl, namespace, "huge")
    planned = condition(job, "Planned")
    assert planned is not None
    assert planned["reason"] == "InsufficientGpuMemory"
    assert "GiB" in planned["message"]
    assert job["status"]["phase"] == "Pending"
    events = wait_for(
        "a Warning event",
        lambda: [e for e in events_for(kubectl, namespace, "huge") if e["type"] == "Warning"],
    )
    assert events[0]["reason"] == "InsufficientGpuMemory"
    assert job_pods(kubectl, namespace, "huge") == []
    # Not hot-looped: nothing is rewritten while nothing changes.
    version = job["metadata"]["resourceVersion"]
    time.sleep(3)
    assert kubectl.job(namespace, "huge")["metadata"]["resourceVersion"] == version
    assert len([e for e in events_for(kubectl, namespace, "huge") if e["type"] == "Warning"]) == 1


def test_a_job_waiting_for_gpus_starts_when_a_node_is_added(
    cluster: Any, kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    product = "NVIDIA-A100-SXM4-80GB"
    kubectl.apply(
        job_manifest(
            "waits",
            namespace,
            resources={"nodes": 1, "gpusPerNode": 8, "gpuProduct": product},
        )
    )
    job = wait_not_planned(kubectl, namespace, "waits")
    planned = condition(job, "Planned")
    assert planned is not None
    assert planned["reason"] == "NoGpuNodes"

    cluster.add_gpu_nodes(1, gpus_per_node=8, gpu_product=product, gpu_memory_mib=81920)
    pods = wait_for("the job's pod", lambda: job_pods(kubectl, namespace, "waits"), timeout=90)
    job = kubectl.job(namespace, "waits")
    planned = condition(job, "Planned")
    assert planned is not None
    assert planned["status"] == "True"
    assert job["status"]["layout"]["gpuMemoryBytes"] == 81920 * 2**20
    assert pods[0]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == product


def test_a_job_waiting_for_gpus_starts_when_another_workloads_pod_gives_them_back(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    # Pods the operator never owned (another team's Deployment, a job of a namespace being
    # deleted) hold GPUs too: when they go, a waiting job gets its turn at once, not at its
    # next routine requeue a minute later.
    blockers = [f"blocker-{i}" for i in range(2)]
    for name in blockers:
        kubectl.apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": {"app": "blocker"}},
                "spec": {
                    "containers": [
                        {"name": "x", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
                    ],
                    # One per node, so no node keeps all 8 GPUs free.
                    "affinity": {
                        "podAntiAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "labelSelector": {"matchLabels": {"app": "blocker"}},
                                    "topologyKey": "kubernetes.io/hostname",
                                }
                            ]
                        }
                    },
                    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                    "terminationGracePeriodSeconds": 0,
                },
            }
        )
    wait_for(
        "both blockers running",
        lambda: all(
            ((kubectl.try_json("get", "pod", "-n", namespace, n) or {}).get("status") or {}).get("phase")
            == "Running"
            for n in blockers
        ),
    )
    kubectl.apply(
        job_manifest(
            "patient",
            namespace,
            resources={"nodes": 1, "gpusPerNode": 8, "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
        )
    )
    job = wait_not_planned(kubectl, namespace, "patient")
    assert (condition(job, "Planned") or {}).get("reason") == "InsufficientGpus"

    kubectl("delete", "pod", "-n", namespace, blockers[0], "--wait=true")
    # Well inside the 60 s requeue an unplanned job otherwise waits for.
    wait_for(
        "the job planned once a node is free",
        lambda: (c := condition(kubectl.job(namespace, "patient"), "Planned")) and c["status"] == "True",
        timeout=20,
    )


def test_pods_with_the_jobs_labels_but_another_owner_are_ignored(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    impostor = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "not-the-jobs",
            "namespace": namespace,
            # Every label the operator sets, copied by hand: only the owner reference differs.
            "labels": {
                "shardwise.dev/job-name": "owned",
                "shardwise.dev/node-rank": "0",
                "shardwise.dev/attempt": "0",
            },
        },
        "spec": {
            "containers": [{"name": "x", "image": "busybox"}],
            "nodeSelector": {"no-such-node": "true"},  # stays Pending
        },
    }
    kubectl.apply(impostor)
    kubectl.apply(job_manifest("owned", namespace, resources={"nodes": 1, "gpusPerNode": 2}))
    pods = wait_for(
        "the job's own pod running",
        lambda: [p for p in job_pods(kubectl, namespace, "owned") if p["metadata"]["name"] == "owned-node-0"
                 and p["status"].get("phase") == "Running"],
    )  # fmt: skip
    wait_for("job Running", lambda: kubectl.job(namespace, "owned")["status"].get("phase") == "Running")
    kubectl.exit_pod(namespace, pods[0]["metadata"]["name"], 0)
    job = wait_for(
        "job Succeeded",
        lambda: (j := kubectl.job(namespace, "owned"))["status"].get("phase") == "Succeeded" and j,
    )
    assert job["status"]["message"] == "all 1 pods completed successfully"
    still = kubectl.json("get", "pod", "not-the-jobs", "-n", namespace)
    assert still["metadata"].get("deletionTimestamp") is None
