"""The trainer's failure reasons on the real control plane: an out-of-memory re-plans once with the
measured peak as the floor, a communication error is retried within the budget.

A pod's end is reported the way a kubelet reports it: the test patches the pod's status with a
terminated container whose termination message is what the trainer writes (its contract lines).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from tests.jobs import Kubectl, condition, condition_is, job_manifest, wait_for
from tests.operator_process import OperatorProcess

pytestmark = pytest.mark.integration

TIMEOUT = 90
GIB = 2**30


def oom_message(rank: int, needed: int | None = None) -> str:
    lines = [
        "shardwise.dev/exit-code=1",
        "shardwise.dev/reason=GpuOutOfMemory",
        "shardwise.dev/retryable=false",
    ]
    if needed is not None:
        lines.append(f"shardwise.dev/gpu-memory-needed-bytes={needed}")
    lines.append(f"rank {rank}: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    return "\n".join(lines) + "\n"


COMM_MESSAGE = (
    "shardwise.dev/exit-code=75\nshardwise.dev/reason=CommunicationError\nshardwise.dev/retryable=true\n"
    "rank 1: DistNetworkError: Connection reset by peer\n"
)


def terminate(kubectl: Kubectl, pod: dict[str, Any], exit_code: int, message: str) -> None:
    """End the pod's trainer container with an exit code and a termination message."""
    container = pod["spec"]["containers"][0]
    status = {
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "reason": "Error",
                            "message": message,
                            "startedAt": pod["status"].get("startTime"),
                            "finishedAt": pod["status"].get("startTime"),
                        }
                    },
                }
            ],
        }
    }
    kubectl(
        "patch", "pod", pod["metadata"]["name"], "-n", pod["metadata"]["namespace"], "--subresource=status",
        "--type=merge", "-p", json.dumps(status),
    )  # fmt: skip


def running(kubectl: Kubectl, namespace: str, name: str, attempt: int) -> dict[str, Any]:
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


def small_job(name: str, namespace: str) -> dict[str, Any]:
    return job_manifest(
        name, namespace, resources={"nodes": 1, "gpusPerNode": 2}, runPolicy={"maxRestarts": 3}
    )


def test_an_out_of_memory_replans_once_with_the_measured_peak_then_fails(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(small_job("oom", namespace))
    pod = running(kubectl, namespace, "oom", 0)
    before = kubectl.job(namespace, "oom")["status"]["layout"]
    terminate(kubectl, pod, 1, oom_message(1, needed=before["gpuMemoryBytes"] + 2 * GIB))

    job = wait_for(
        "re-planned after the out-of-memory",
        lambda: condition_is(j := kubectl.job(namespace, "oom"), "Replanned", "True") and j,
        timeout=TIMEOUT,
    )
    replanned = condition(job, "Replanned")
    assert replanned is not None and replanned["reason"] == "OutOfMemoryReplan"
    assert job["status"]["restarts"] == 1
    correction = job["status"]["memoryCorrection"]
    assert correction["neededBytes"] == before["gpuMemoryBytes"] + 2 * GIB
    assert correction["predictedBytes"] == before["predictedGpuMemoryBytes"]
    assert correction["factor"] * before["predictedGpuMemoryBytes"] > before["gpuMemoryBytes"]
    assert before["summary"] in replanned["message"] and "→" in replanned["message"]

    pod = running(kubectl, namespace, "oom", 1)
    after = kubectl.job(namespace, "oom")["status"]["layout"]
    knobs = (
        "tensor",
        "pipeline",
        "data",
        "zeroStage",
        "microBatchSize",
        "activationCheckpointing",
        "offload",
    )
    assert [after[k] for k in knobs] != [before[k] for k in knobs]
    assert after["predictedGpuMemoryBytes"] * correction["factor"] <= before["gpuMemoryBytes"]
    # The new plan reached the pods' layout ConfigMap.
    document = json.loads(
        kubectl.json("get", "configmap", "oom-layout", "-n", namespace)["data"]["layout.json"]
    )
    assert document["layout"]["zero_stage"] == after["zeroStage"]
    events = kubectl.events(namespace, "oom")
    assert any(e["reason"] == "OutOfMemoryReplan" and e["type"] == "Warning" for e in events)

    # A second out-of-memory, on the corrected plan: the job fails, with no second re-plan.
    terminate(kubectl, pod, 1, oom_message(0))
    job = wait_for(
        "Failed",
        lambda: condition_is(j := kubectl.job(namespace, "oom"), "Failed", "True") and j,
        timeout=TIMEOUT,
    )
    failed = condition(job, "Failed")
    assert failed is not None and failed["reason"] == "GpuOutOfMemory"
    assert "after the one out-of-memory re-plan" in failed["message"]
    assert job["status"]["restarts"] == 1
    assert job["status"]["memoryCorrection"] == correction


def test_an_out_of_memory_with_no_layout_left_fails_with_the_planners_diagnosis(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(small_job("nofit", namespace))
    pod = running(kubectl, namespace, "nofit", 0)
    terminate(kubectl, pod, 1, oom_message(0, needed=60 * 80 * GIB))  # x60: nothing fits
    job = wait_for(
        "Failed",
        lambda: condition_is(j := kubectl.job(namespace, "nofit"), "Failed", "True") and j,
        timeout=TIMEOUT,
    )
    failed = condition(job, "Failed")
    assert failed is not None and failed["reason"] == "GpuOutOfMemory"
    assert "nothing fits (InsufficientGpuMemory)" in failed["message"]
    # measured / predicted: 60 GPUs' worth over a prediction a little under one GPU
    assert re.search(r"over the measured memory correction x6\d(\.\d+)?\)", failed["message"])
    assert job["status"].get("restarts", 0) == 0


def test_a_communication_error_is_retried_within_the_budget(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(small_job("comm", namespace))
    pod = running(kubectl, namespace, "comm", 0)
    before = kubectl.job(namespace, "comm")["status"]["layout"]
    terminate(kubectl, pod, 1, COMM_MESSAGE)  # torchrun's own code is 1: the trainer's 75 wins
    running(kubectl, namespace, "comm", 1)
    job = kubectl.job(namespace, "comm")
    assert job["status"]["restarts"] == 1
    assert job["status"]["layout"] == before  # the same layout: a new attempt may not meet it
    assert not condition_is(job, "Failed", "True") and "memoryCorrection" not in job["status"]
    restarting = [e for e in kubectl.events(namespace, "comm") if e["reason"] == "Restarting"]
    assert restarting and "CommunicationError" in restarting[0]["message"]
