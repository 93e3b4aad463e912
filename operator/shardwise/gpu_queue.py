"""Pure GPU admission without a batch scheduler: what other jobs hold, and who plans first.

A planned job holds its GPUs from the moment it is planned until it finishes, whether its pods
exist or are bound yet; a waiting job plans only when no job ahead of it (PriorityClass value,
then creationTimestamp) waits for any of the same nodes. Input is plain job, node and pod dicts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from shardwise import inventory, remediation
from shardwise.conditions import get_condition
from shardwise.jobstatus import PLANNED, finished
from shardwise.resources.names import LABEL_JOB

# Planned=False reasons of a job that waits for GPUs to free up (and so keeps its place in the
# queue); a job refused for any other reason (does not fit in memory, bad template) waits for a
# spec change, and holding the line behind it would stall every later job for nothing.
WAITING_REASONS: Final = frozenset({"InsufficientGpus", "Replanning"})

JobKey = tuple[str, str]


@dataclass(frozen=True)
class Placement:
    """Where a job's pods may go: the node selector, tolerations and GPU resource it asks for."""

    selector: dict[str, str]
    tolerations: list[Mapping[str, Any]]
    gpu_resource: str


def placement(spec: Mapping[str, Any], layout: Mapping[str, Any] | None = None) -> Placement:
    """The job's placement; with a layout, also the GPU product the plan pinned its pods to."""
    res = spec.get("resources") or {}
    template_spec = (spec.get("template") or {}).get("spec") or {}
    selector = {**(template_spec.get("nodeSelector") or {}), **(res.get("nodeSelector") or {})}
    if res.get("gpuProduct"):
        selector[inventory.LABEL_GPU_PRODUCT] = res["gpuProduct"]
    if layout and layout.get("gpuProduct"):
        selector[inventory.LABEL_GPU_PRODUCT] = str(layout["gpuProduct"])
    tolerations = [*(template_spec.get("tolerations") or []), *(res.get("tolerations") or [])]
    return Placement(selector, tolerations, res.get("gpuResource") or "nvidia.com/gpu")


def key_of(job: Mapping[str, Any]) -> JobKey:
    meta = job.get("metadata") or {}
    return (str(meta.get("namespace")), str(meta.get("name")))


def _suspended(job: Mapping[str, Any]) -> bool:
    return bool(((job.get("spec") or {}).get("runPolicy") or {}).get("suspend"))


def _active(job: Mapping[str, Any]) -> bool:
    meta = job.get("metadata") or {}
    return not meta.get("deletionTimestamp") and not finished(job.get("status") or {}) and not _suspended(job)


def holds_plan(job: Mapping[str, Any]) -> bool:
    """Planned and not finished, suspended, being deleted or queued by Kueue (whose quota holds
    nothing on the nodes until it admits the job): its GPUs are spoken for."""
    status = job.get("status") or {}
    return _active(job) and bool(status.get("layout")) and status.get("phase") not in ("Queued", "Suspended")


def waiting_for_gpus(job: Mapping[str, Any]) -> bool:
    """Unplanned, and either never passed yet or waiting for GPUs (not for a spec change)."""
    if not _active(job) or (job.get("status") or {}).get("layout"):
        return False
    planned = get_condition((job.get("status") or {}).get("conditions") or [], PLANNED)
    return planned is None or planned.get("reason") in WAITING_REASONS


def queue_order(job: Mapping[str, Any], priority: int) -> tuple[int, str, str, str]:
    """Sort key: higher PriorityClass value first, then the older job, then by name."""
    meta = job.get("metadata") or {}
    return (
        -priority,
        str(meta.get("creationTimestamp") or ""),
        str(meta.get("namespace")),
        str(meta.get("name")),
    )


class _EligibleCache:
    """The placement's GPU nodes (all GPUs counted free) once per distinct placement: most jobs of
    a cluster ask for the same nodes, and a pass looks at every other job."""

    def __init__(self, nodes: Sequence[Mapping[str, Any]]) -> None:
        self.nodes = nodes
        self.seen: dict[str, list[inventory.NodeGpus]] = {}

    def gpu_nodes(self, where: Placement) -> list[inventory.NodeGpus]:
        key = json.dumps([where.selector, where.tolerations, where.gpu_resource], sort_keys=True, default=str)
        if key not in self.seen:
            self.seen[key] = inventory.gpu_nodes(
                self.nodes,
                (),
                gpu_resource=where.gpu_resource,
                node_selector=where.selector,
                tolerations=list(where.tolerations),
            )
        return self.seen[key]

    def __call__(self, where: Placement) -> frozenset[str]:
        return frozenset(n.name for n in self.gpu_nodes(where))


def eligible_names(nodes: Sequence[Mapping[str, Any]], where: Placement) -> frozenset[str]:
    """Names of the Ready, schedulable nodes offering GPUs that the placement allows."""
    return _EligibleCache(nodes)(where)


def could_ever_fit(spec: Mapping[str, Any], nodes: list[inventory.NodeGpus]) -> bool:
    """The job's GPU request fits these nodes when nothing else runs: only such a job keeps its
    place in the queue (one larger than its nodes waits for nodes, and holds no one up)."""
    res = spec.get("resources") or {}
    try:
        inventory.choose_shape(
            nodes, gpus=res.get("gpus"), node_count=res.get("nodes"), gpus_per_node=res.get("gpusPerNode")
        )
    except inventory.InventoryError:
        return False
    return True


def plan_claims(
    jobs: Iterable[Mapping[str, Any]],
    nodes: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    *,
    gpu_resource: str,
    skip: JobKey,
) -> list[inventory.Claim]:
    """What other planned jobs hold beyond their bound pods (which the inventory counts itself):
    one claim per job for its pods not created or not bound yet, on the nodes it could use."""
    bound: dict[JobKey, set[str]] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        job_name = (meta.get("labels") or {}).get(LABEL_JOB)
        node = (pod.get("spec") or {}).get("nodeName")
        if job_name and node and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            bound.setdefault((str(meta.get("namespace")), str(job_name)), set()).add(str(node))
    claims: list[inventory.Claim] = []
    eligible = _EligibleCache(nodes)
    for job in jobs:
        key = key_of(job)
        if key == skip or not holds_plan(job):
            continue
        layout = job["status"]["layout"]
        where = placement(job.get("spec") or {}, layout)
        if where.gpu_resource != gpu_resource:
            continue
        on = bound.get(key, set())
        missing = int(layout.get("nodes") or 0) - len(on)
        if missing > 0:
            allowed = eligible(where) - remediation.excluded_names(job.get("status") or {})
            claims.append(
                inventory.Claim(
                    pods=missing,
                    gpus_per_node=int(layout.get("gpusPerNode") or 0),
                    nodes=allowed,
                    avoid=frozenset(on),
                )
            )
    return claims


def ahead_in_queue(
    job: Mapping[str, Any],
    jobs: Iterable[Mapping[str, Any]],
    nodes: Sequence[Mapping[str, Any]],
    priority: Callable[[Mapping[str, Any]], int],
) -> list[JobKey]:
    """Jobs waiting for GPUs that come before this one, could use any of its nodes and would fit
    them once GPUs free up, in queue order."""
    eligible = _EligibleCache(nodes)
    mine = eligible(placement(job.get("spec") or {}))
    me = queue_order(job, priority(job))
    ahead: list[tuple[tuple[int, str, str, str], JobKey]] = []
    for other in jobs:
        if key_of(other) == key_of(job) or not waiting_for_gpus(other):
            continue
        order = queue_order(other, priority(other))
        if order >= me:
            continue
        theirs = eligible.gpu_nodes(placement(other.get("spec") or {}))
        if mine & {n.name for n in theirs} and could_ever_fit(other.get("spec") or {}, theirs):
            ahead.append((order, key_of(other)))
    return [key for _, key in sorted(ahead)]
