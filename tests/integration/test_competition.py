"""Competition without a batch scheduler: 20 jobs of 16 GPUs created at once on 32 GPUs.

Four tainted KWOK nodes x 8 GPUs that only these jobs tolerate. The test samples the pods while
the jobs run and ends each gang with exit code 0 as soon as all its pods run (KWOK runs nothing):
never more than 32 GPUs requested by bound pods, no partial gang bound for longer than one
reconcile, exactly two jobs at a time, all 20 finished in creation order. Sampling is enough:
a job's pods stay bound until the test itself ends them, so no job can start, double-book and
finish between two samples unseen.

The figures go to benchmarks/results/competition.md (no assertion on timings).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import pytest
from tests.jobs import Kubectl, condition_is, job_manifest, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results" / "competition.md"
JOBS = 20
NODES = 4
GPUS_PER_NODE = 8
TAINT_KEY = "shardwise.dev/competition"
# "One reconcile": a gang's pods are created in one pass and bound by the scheduler within a
# moment; a gang still partly bound after the operator's requeue of a starting job would be a
# double booking the scheduler could not resolve.
PARTIAL_LIMIT_SECONDS = 15.0
TIMEOUT = 600.0


def _pool(cluster: Any, kubectl: Kubectl, namespace: str, count: int, prefix: str) -> list[str]:
    """KWOK GPU nodes labelled pool=<namespace> and tainted so that only this test's jobs land there."""
    nodes: list[str] = cluster.add_gpu_nodes(
        count, gpus_per_node=GPUS_PER_NODE, prefix=f"{prefix}-{namespace}"
    )
    kubectl("label", "node", *nodes, f"pool={namespace}")
    kubectl("taint", "nodes", *nodes, f"{TAINT_KEY}=true:NoSchedule", "--overwrite")
    return nodes


def _pool_job(name: str, namespace: str, priority_class: str | None = None) -> dict[str, Any]:
    """A job of 2 nodes x 8 GPUs on the test's pool."""
    manifest = job_manifest(
        name,
        namespace,
        resources={
            "nodes": 2,
            "gpusPerNode": GPUS_PER_NODE,
            "nodeSelector": {"pool": namespace},
            "tolerations": [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
        },
    )
    if priority_class:
        manifest["spec"]["template"]["spec"]["priorityClassName"] = priority_class
    return manifest


def _examples(messages: set[str]) -> list[str]:
    head = [m for m in sorted(messages) if "waiting in the queue" not in m]
    behind = [m for m in sorted(messages) if "waiting in the queue" in m]
    return head[:1] + behind[:1]


def test_twenty_jobs_of_16_gpus_on_32_gpus_run_two_at_a_time_in_creation_order(
    cluster: Any, kubectl: Kubectl, operator: Any, namespace: str
) -> None:
    nodes = _pool(cluster, kubectl, namespace, NODES, "compete")
    names = [f"job-{i:02d}" for i in range(JOBS)]
    manifests = [_pool_job(name, namespace) for name in names]
    started = time.monotonic()
    # One request per job in name order: creation order is name order (creationTimestamps have
    # one-second resolution; the queue breaks their ties by name).
    kubectl("create", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}))

    max_bound_gpus = 0
    max_concurrent = 0
    partial_since: dict[str, float] = {}
    longest_partial = 0.0
    start_order: list[str] = []
    finish_order: list[str] = []
    ended: set[str] = set()
    waiting_messages: set[str] = set()
    samples = 0
    while len(finish_order) < JOBS:
        assert time.monotonic() - started < TIMEOUT, f"only {finish_order} finished in {TIMEOUT}s"
        now = time.monotonic()
        pods = kubectl.json("get", "pods", "-n", namespace)["items"]
        samples += 1
        bound: dict[str, list[dict[str, Any]]] = {}
        for pod in pods:
            if pod["spec"].get("nodeName") and pod["status"].get("phase") not in ("Succeeded", "Failed"):
                bound.setdefault(pod["metadata"]["labels"]["shardwise.dev/job-name"], []).append(pod)
        gpus = sum(
            int(c["resources"]["limits"]["nvidia.com/gpu"])
            for ps in bound.values()
            for p in ps
            for c in p["spec"]["containers"]
        )
        max_bound_gpus = max(max_bound_gpus, gpus)
        max_concurrent = max(max_concurrent, len(bound))
        assert gpus <= NODES * GPUS_PER_NODE, f"{gpus} GPUs requested by bound pods: {sorted(bound)}"
        assert len(bound) <= 2, f"more than two jobs hold GPUs: {sorted(bound)}"
        for name, ps in bound.items():
            if name not in start_order:
                start_order.append(name)
            if len(ps) < 2:
                partial_since.setdefault(name, now)
                longest_partial = max(longest_partial, now - partial_since[name])
                assert now - partial_since[name] < PARTIAL_LIMIT_SECONDS, f"{name}: partial gang {ps}"
            else:
                partial_since.pop(name, None)
                if name not in ended and all(p["status"].get("phase") == "Running" for p in ps):
                    for p in ps:
                        kubectl.exit_pod(namespace, p["metadata"]["name"], 0)
                    ended.add(name)
        for name in sorted(ended - set(finish_order)):
            job = kubectl.job(namespace, name)
            if condition_is(job, "Succeeded", "True"):
                finish_order.append(name)
        if samples % 10 == 1:
            for job in kubectl.json("get", "ptj", "-n", namespace)["items"]:
                if condition_is(job, "Planned", "False", "InsufficientGpus"):
                    waiting_messages.add(job["status"]["message"])
        time.sleep(0.2)
    wall = time.monotonic() - started

    assert start_order == names, start_order
    assert finish_order == names, finish_order
    assert max_concurrent == 2
    assert waiting_messages, "no waiting job ever said why it waits"
    assert all("the job needs 2 nodes × 8 GPUs but the matching nodes have" in m for m in waiting_messages), (
        waiting_messages
    )

    lines = [
        "# Competition without a batch scheduler",
        "",
        "`tests/integration/test_competition.py`: 20 ParallelTrainingJobs of 2 nodes x 8 GPUs created",
        "at once (one `kubectl create` of a List) on 4 KWOK nodes x 8 GPUs (32 GPUs), operator and",
        "control plane on this machine; the test ends each gang (exit code 0) once all its pods run.",
        "Figures, not thresholds.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| jobs | {JOBS} x 16 GPUs on {NODES * GPUS_PER_NODE} GPUs |",
        f"| samples of the pods (kubectl, 0.2 s apart) | {samples}, one per {wall / samples:.1f} s |",
        f"| most GPUs requested by bound pods at once | {max_bound_gpus} |",
        f"| most jobs with bound pods at once | {max_concurrent} |",
        f"| longest partly bound gang seen | {longest_partial:.1f} s |",
        f"| start order = creation order | {start_order == names} |",
        f"| finish order = creation order | {finish_order == names} |",
        f"| wall time, create to the 20th Succeeded | {wall:.1f} s ({wall / JOBS:.1f} s per job) |",
        "",
        "Waiting jobs' messages (`Planned=False`, `InsufficientGpus`), the head of the queue and one",
        "behind it:",
        "",
        *(f"> {m}\n" for m in _examples(waiting_messages)),
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
    kubectl("delete", "node", *nodes, "--wait=false")


def test_a_higher_priority_job_waiting_for_gpus_starts_before_an_older_lower_one(
    cluster: Any, kubectl: Kubectl, operator: Any, namespace: str
) -> None:
    """Queue order is PriorityClass value first, then creation time: with the pool busy, an older
    low-priority job and a newer high-priority one both wait; when the GPUs free up the
    high-priority one is planned first, and the low one after it."""
    nodes = _pool(cluster, kubectl, namespace, 2, "prio")
    high = f"shardwise-high-{namespace}"
    kubectl("create", "priorityclass", high, "--value=100000")
    job = functools.partial(_pool_job, namespace=namespace)

    def running(name: str) -> list[dict[str, Any]] | None:
        pods = kubectl.pods(namespace, name)
        return pods if len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods) else None

    def waiting(name: str) -> bool:
        return condition_is(kubectl.job(namespace, name), "Planned", "False", "InsufficientGpus")

    try:
        kubectl.apply(job("busy"))
        busy = wait_for("busy running", lambda: running("busy"), timeout=90)
        kubectl.apply(job("low"))
        wait_for("low waiting", lambda: waiting("low"), timeout=60)
        time.sleep(1.1)  # a later creationTimestamp (second resolution)
        kubectl.apply(job("urgent", priority_class=high))
        wait_for("urgent waiting", lambda: waiting("urgent"), timeout=60)
        for pod in busy:
            kubectl.exit_pod(namespace, pod["metadata"]["name"], 0)
        urgent = wait_for("urgent running", lambda: running("urgent"), timeout=90)
        assert kubectl.pods(namespace, "low") == [] and waiting("low")
        message = kubectl.job(namespace, "low")["status"]["message"]
        assert f"{namespace}/urgent" in message or "matching nodes have 0 free" in message, message
        for pod in urgent:
            kubectl.exit_pod(namespace, pod["metadata"]["name"], 0)
        wait_for("low running", lambda: running("low"), timeout=90)
    finally:
        kubectl("delete", "priorityclass", high, "--wait=false")
        kubectl("delete", "node", *nodes, "--wait=false")
