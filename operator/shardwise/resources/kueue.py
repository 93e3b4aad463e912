"""Kueue's external-framework contract, pure: the job's Workload, reading its admission, releasing it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from shardwise.resources.names import job_labels
from shardwise.resources.owner import owner_reference

KUEUE_GROUP: Final = "kueue.x-k8s.io"
KUEUE_API_VERSION: Final = f"{KUEUE_GROUP}/v1beta2"
WORKLOAD_KIND: Final = "Workload"
QUEUE_LABEL: Final = f"{KUEUE_GROUP}/queue-name"
PRIORITY_LABEL: Final = f"{KUEUE_GROUP}/priority-class"
WORKLOAD_PRIORITY_SOURCE: Final = f"{KUEUE_GROUP}/workloadpriorityclass"
POD_PRIORITY_SOURCE: Final = "scheduling.k8s.io/priorityclass"
POD_SET: Final = "main"
# Kueue's Workload condition types.
QUOTA_RESERVED: Final = "QuotaReserved"
ADMITTED: Final = "Admitted"
EVICTED: Final = "Evicted"
FINISHED: Final = "Finished"
REQUEUED: Final = "Requeued"

State = Literal["Pending", "Admitted", "Evicted"]


def queue_name(job: dict[str, Any]) -> str | None:
    """The LocalQueue a job is submitted to (its `kueue.x-k8s.io/queue-name` label), if any."""
    value = ((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)
    return str(value) if value else None


def workload_name(job: str) -> str:
    """The job's Workload: one per job, a fixed name like every other child."""
    return f"ptj-{job}"[:253]


def _pod_set_template(pod: dict[str, Any]) -> dict[str, Any]:
    """What Kueue needs of a pod: containers' requests, placement, priority (nothing else)."""
    spec = pod.get("spec") or {}
    containers = [
        {
            "name": c["name"],
            "image": c.get("image") or "none",
            "resources": copy.deepcopy(c.get("resources") or {}),
        }
        for c in spec.get("containers") or []
    ]
    template_spec: dict[str, Any] = {"containers": containers, "restartPolicy": "Never"}
    for key in ("nodeSelector", "tolerations", "priorityClassName"):
        if spec.get(key):
            template_spec[key] = copy.deepcopy(spec[key])
    return {
        "metadata": {"labels": dict((pod.get("metadata") or {}).get("labels") or {})},
        "spec": template_spec,
    }


def build_workload(
    job: dict[str, Any],
    pod: dict[str, Any],
    count: int,
    *,
    priority: int | None = None,
    priority_class: str | None = None,
    priority_source: str = WORKLOAD_PRIORITY_SOURCE,
) -> dict[str, Any]:
    """The job's Workload: one pod set of `count` pods shaped like `pod` (rank 0 as built)."""
    meta = job["metadata"]
    queue = queue_name(job)
    if queue is None:
        raise ValueError(f"job {meta['name']} has no {QUEUE_LABEL} label")
    spec: dict[str, Any] = {
        "queueName": queue,
        "podSets": [{"name": POD_SET, "count": count, "template": _pod_set_template(pod)}],
    }
    if priority_class:
        spec["priorityClassRef"] = {
            "group": "scheduling.k8s.io" if priority_source == POD_PRIORITY_SOURCE else KUEUE_GROUP,
            "kind": "PriorityClass" if priority_source == POD_PRIORITY_SOURCE else "WorkloadPriorityClass",
            "name": priority_class,
        }
    if priority is not None:
        spec["priority"] = priority
    return {
        "apiVersion": KUEUE_API_VERSION,
        "kind": WORKLOAD_KIND,
        "metadata": {
            "name": workload_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {**job_labels(meta["name"]), QUEUE_LABEL: queue},
            "ownerReferences": [owner_reference(job)],
        },
        "spec": spec,
    }


def _condition(workload: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    conditions = (workload.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == ctype), None)


def _true(workload: dict[str, Any], ctype: str) -> bool:
    found = _condition(workload, ctype)
    return bool(found and found.get("status") == "True")


@dataclass(frozen=True)
class Admission:
    """What Kueue decided: Admitted (with the flavors per resource), Evicted, or still Pending."""

    state: State
    reason: str
    message: str
    flavors: dict[str, str] = field(default_factory=dict)


def admission(workload: dict[str, Any]) -> Admission:
    """Read the Workload's status the way Kueue's job reconciler does (eviction first)."""
    status = workload.get("status") or {}
    evicted = _condition(workload, EVICTED)
    if evicted and evicted.get("status") == "True":
        return Admission(
            "Evicted", str(evicted.get("reason") or "Evicted"), str(evicted.get("message") or "")
        )
    assigned = status.get("admission")
    if assigned and _true(workload, ADMITTED):
        flavors: dict[str, str] = {}
        for ps in assigned.get("podSetAssignments") or []:
            if ps.get("name") == POD_SET:
                flavors = {str(k): str(v) for k, v in (ps.get("flavors") or {}).items()}
        cq = assigned.get("clusterQueue", "")
        return Admission("Admitted", "Admitted", f"admitted by ClusterQueue {cq}", flavors)
    reserved = _condition(workload, QUOTA_RESERVED)
    if reserved is not None and reserved.get("status") == "True":
        # Quota reserved, admission checks still running.
        return Admission("Pending", "QuotaReserved", str(reserved.get("message") or "quota reserved"))
    pending = reserved or _condition(workload, ADMITTED)
    if pending is not None and pending.get("status") != "True":
        reason = str(pending.get("reason") or "Pending")
        return Admission("Pending", reason, str(pending.get("message") or ""))
    return Admission("Pending", "Pending", "waiting for Kueue to consider the Workload")


def flavor_placement(flavors: list[dict[str, Any]]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The node selector and tolerations the admitted ResourceFlavors ask pods to carry."""
    selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    for flavor in flavors:
        spec = flavor.get("spec") or {}
        selector.update({str(k): str(v) for k, v in (spec.get("nodeLabels") or {}).items()})
        for tol in spec.get("tolerations") or []:
            if tol not in tolerations:
                tolerations.append(copy.deepcopy(tol))
    return selector, tolerations


def with_placement(
    job: dict[str, Any], selector: dict[str, str], tolerations: list[dict[str, Any]]
) -> dict[str, Any]:
    """A copy of the job whose pods also carry the admitted flavors' selector and tolerations."""
    if not selector and not tolerations:
        return job
    placed = copy.deepcopy(job)
    res = placed.setdefault("spec", {}).setdefault("resources", {})
    res["nodeSelector"] = {**(res.get("nodeSelector") or {}), **selector}
    res["tolerations"] = [
        *(res.get("tolerations") or []),
        *[t for t in tolerations if t not in (res.get("tolerations") or [])],
    ]
    return placed


def _set(conditions: list[dict[str, Any]], cond: dict[str, Any]) -> list[dict[str, Any]]:
    previous = next((c for c in conditions if c.get("type") == cond["type"]), None)
    if previous is not None and previous.get("status") == cond["status"]:
        cond = {**cond, "lastTransitionTime": previous.get("lastTransitionTime", cond["lastTransitionTime"])}
    if previous is None:
        return [*conditions, cond]
    return [cond if c.get("type") == cond["type"] else c for c in conditions]


def _cond(
    workload: dict[str, Any], ctype: str, *, status: bool, reason: str, message: str, now: str
) -> dict[str, Any]:
    return {
        "type": ctype,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message[:32000],
        "lastTransitionTime": now,
        "observedGeneration": int((workload.get("metadata") or {}).get("generation") or 1),
    }


def release_status(workload: dict[str, Any], now: str) -> dict[str, Any]:
    """After an evicted job's pods are gone: clear the admission so Kueue can queue it again.

    What Kueue's own job reconciler does for its built-in integrations (jobframework, step
    "handle eviction"): Requeued=True after a preemption, QuotaReserved=False (Pending), admission
    removed, Admitted=False. Returned as a whole status for a merge patch of workloads/status.
    """
    evicted = _condition(workload, EVICTED) or {}
    reason = str(evicted.get("reason") or "Evicted")
    message = str(evicted.get("message") or "evicted")
    conditions = list((workload.get("status") or {}).get("conditions") or [])
    requeue = reason in ("Preempted", "NodeFailures")
    conditions = _set(
        conditions, _cond(workload, REQUEUED, status=requeue, reason=reason, message=message, now=now)
    )
    conditions = _set(
        conditions, _cond(workload, QUOTA_RESERVED, status=False, reason="Pending", message=message, now=now)
    )
    if _condition(workload, ADMITTED) is not None:
        conditions = _set(
            conditions,
            _cond(
                workload,
                ADMITTED,
                status=False,
                reason="NoReservation",
                message="The workload has no reservation",
                now=now,
            ),
        )
    return {"admission": None, "conditions": conditions}


def finished_status(workload: dict[str, Any], succeeded: bool, message: str, now: str) -> dict[str, Any]:
    """Finished=True: Kueue releases the quota (reason Succeeded or Failed, as its job integrations)."""
    conditions = list((workload.get("status") or {}).get("conditions") or [])
    cond = _cond(
        workload,
        FINISHED,
        status=True,
        reason="Succeeded" if succeeded else "Failed",
        message=message,
        now=now,
    )
    return {"conditions": _set(conditions, cond)}


def pod_set_count(workload: dict[str, Any]) -> int | None:
    """How many pods the Workload asks for (None if it has no `main` pod set)."""
    for ps in (workload.get("spec") or {}).get("podSets") or []:
        if ps.get("name") == POD_SET:
            return int(ps.get("count") or 0)
    return None


def is_finished(workload: dict[str, Any]) -> bool:
    return _true(workload, FINISHED)
