"""Gang scheduling, pure: the PodGroup (coscheduling or Volcano) and what each pod carries to join it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from shardwise.resources.names import job_labels
from shardwise.resources.owner import owner_reference

Gang = Literal["Coscheduling", "Volcano"]

# scheduler-plugins' coscheduling plugin (sigs.k8s.io/scheduler-plugins, apis/scheduling/v1alpha1).
COSCHEDULING_API_VERSION: Final = "scheduling.x-k8s.io/v1alpha1"
COSCHEDULING_LABEL: Final = "scheduling.x-k8s.io/pod-group"
COSCHEDULING_SCHEDULER: Final = "scheduler-plugins-scheduler"
# Volcano (volcano.sh/apis, scheduling/v1beta1).
VOLCANO_API_VERSION: Final = "scheduling.volcano.sh/v1beta1"
VOLCANO_ANNOTATION: Final = "scheduling.k8s.io/group-name"
VOLCANO_SCHEDULER: Final = "volcano"
DEFAULT_SCHEDULE_TIMEOUT: Final = 300


@dataclass(frozen=True)
class GangSpec:
    """spec.scheduling as the builders need it."""

    kind: Gang
    scheduler_name: str
    schedule_timeout_seconds: int
    queue: str | None = None  # Volcano's queue


def gang_spec(job: dict[str, Any]) -> GangSpec | None:
    """The job's gang settings (spec.scheduling.gang), None when it schedules pod by pod."""
    scheduling = (job.get("spec") or {}).get("scheduling") or {}
    gang = scheduling.get("gang") or {}
    kind = gang.get("kind")
    if kind not in ("Coscheduling", "Volcano"):
        return None
    default = COSCHEDULING_SCHEDULER if kind == "Coscheduling" else VOLCANO_SCHEDULER
    return GangSpec(
        kind=kind,
        scheduler_name=str(scheduling.get("schedulerName") or default),
        schedule_timeout_seconds=int(gang.get("scheduleTimeoutSeconds") or DEFAULT_SCHEDULE_TIMEOUT),
        queue=gang.get("queue"),
    )


def podgroup_name(job: str) -> str:
    return job


def build_podgroup(job: dict[str, Any], gang: GangSpec, members: int, gpus: dict[str, str]) -> dict[str, Any]:
    """The PodGroup: min member = every pod of the job, so all of them are bound or none."""
    meta = job["metadata"]
    metadata = {
        "name": podgroup_name(meta["name"]),
        "namespace": meta["namespace"],
        "labels": job_labels(meta["name"]),
        "ownerReferences": [owner_reference(job)],
    }
    if gang.kind == "Coscheduling":
        return {
            "apiVersion": COSCHEDULING_API_VERSION,
            "kind": "PodGroup",
            "metadata": metadata,
            "spec": {
                "minMember": members,
                "minResources": dict(gpus),
                "scheduleTimeoutSeconds": gang.schedule_timeout_seconds,
            },
        }
    spec: dict[str, Any] = {"minMember": members, "minResources": dict(gpus)}
    if gang.queue:
        spec["queue"] = gang.queue
    return {"apiVersion": VOLCANO_API_VERSION, "kind": "PodGroup", "metadata": metadata, "spec": spec}


def with_gang(pod: dict[str, Any], job: str, gang: GangSpec) -> dict[str, Any]:
    """The pod joins the group: the gang scheduler's name and the group's label / annotation."""
    meta = pod.setdefault("metadata", {})
    pod.setdefault("spec", {})["schedulerName"] = gang.scheduler_name
    if gang.kind == "Coscheduling":
        meta.setdefault("labels", {})[COSCHEDULING_LABEL] = podgroup_name(job)
    else:
        meta.setdefault("annotations", {})[VOLCANO_ANNOTATION] = podgroup_name(job)
    return pod
