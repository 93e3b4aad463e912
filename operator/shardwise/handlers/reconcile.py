"""The reconcile pass for one ParallelTrainingJob: read cached state, plan, apply children, patch status.

Driven by current state only, so it is idempotent: a pass that finds everything in place
changes nothing and writes nothing.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shardwise import inventory
from shardwise.conditions import is_true
from shardwise.jobstatus import (
    PLANNED,
    Event,
    changed_events,
    finished,
    with_plan,
    with_plan_failure,
    with_pods,
)
from shardwise.kube.children import ChildConflictError, ensure
from shardwise.kube.client import Kube, KubeError
from shardwise.kube.events import post_event
from shardwise.planning import PlanOutcome, plan_job
from shardwise.podstate import summarize
from shardwise.resources.configmap import build_configmap
from shardwise.resources.names import API_VERSION, KIND, configmap_name
from shardwise.resources.pods import PodShape, TemplateError, build_pod
from shardwise.resources.service import build_service

log = logging.getLogger(__name__)

JobKey = tuple[str, str]

# How long to wait before looking again when nothing will poke the job sooner.
REQUEUE_UNPLANNED = 60.0
REQUEUE_STARTING = 15.0
REQUEUE_RUNNING = 60.0


@dataclass
class ClusterView:
    """Read access to the operator's watch caches (kopf indexes): no API calls."""

    job: Callable[[JobKey], dict[str, Any] | None]
    nodes: Callable[[], list[dict[str, Any]]]
    bound_pods: Callable[[], list[dict[str, Any]]]
    job_pods: Callable[[JobKey], list[dict[str, Any]]]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class JobLog(logging.LoggerAdapter[logging.Logger]):
    """Every line names the object: `ParallelTrainingJob ns/name: ...`."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{KIND} {self.extra['key'] if self.extra else '?'}: {msg}", kwargs


@dataclass
class Reconciler:
    """One pass per call; the caller serializes passes per job (see workqueue.py)."""

    kube: Kube
    view: ClusterView
    now: Callable[[], str] = _now
    on_pass: Callable[[JobKey, dict[str, Any]], None] | None = None

    async def reconcile(self, key: JobKey) -> float | None:
        """Bring one job a step closer to its desired state; returns seconds until the next look."""
        job = self.view.job(key)
        if job is None or (job.get("metadata") or {}).get("deletionTimestamp"):
            return None
        job = copy.deepcopy(job)
        job.setdefault("apiVersion", API_VERSION)
        job.setdefault("kind", KIND)
        jlog = JobLog(log, {"key": f"{key[0]}/{key[1]}"})
        status: dict[str, Any] = copy.deepcopy(job.get("status") or {})
        before = copy.deepcopy(status)
        extra_events: list[Event] = []
        requeue: float | None = None

        if finished(status):
            requeue = None
        else:
            status, requeue = await self._advance(job, status, extra_events, jlog)

        if status != before:
            await self.kube.merge_patch(
                API_VERSION, KIND, key[0], key[1], {"status": status}, subresource="status"
            )
            jlog.info("status: phase %s, %s", status.get("phase"), status.get("message", ""))
        for event in [*changed_events(before, status), *extra_events]:
            await post_event(self.kube, job, event.type, event.reason, event.message)
        if self.on_pass is not None:
            self.on_pass(key, status)
        return requeue

    async def _advance(
        self, job: dict[str, Any], status: dict[str, Any], events: list[Event], jlog: JobLog
    ) -> tuple[dict[str, Any], float | None]:
        meta, spec = job["metadata"], job.get("spec") or {}
        key: JobKey = (meta["namespace"], meta["name"])
        generation = int(meta.get("generation") or 1)
        now = self.now()
        pods = self.view.job_pods(key)
        attempt = int(status.get("attempt") or 0)

        planned = is_true(status.get("conditions") or [], PLANNED) and bool(status.get("layout"))
        outcome: PlanOutcome | None = None
        if not planned:
            outcome = self._plan(job, pods)
            if not outcome.feasible or outcome.layout_status is None:
                jlog.info("not planned: %s: %s", outcome.reason, outcome.message)
                return with_plan_failure(
                    status, outcome.reason, outcome.message, now=now, generation=generation
                ), REQUEUE_UNPLANNED
            status = with_plan(status, outcome.layout_status, outcome.message, now=now, generation=generation)
            jlog.info("planned %s", outcome.layout_status.get("summary"))

        layout = status["layout"]
        shape = PodShape(
            nodes=int(layout["nodes"]),
            gpus_per_node=int(layout["gpusPerNode"]),
            attempt=attempt,
            gpu_resource=(spec.get("resources") or {}).get("gpuResource") or "nvidia.com/gpu",
        )
        summary = summarize(pods, expected=shape.nodes, attempt=attempt)

        if summary.missing and not summary.failures:
            try:
                await self._ensure_shared_children(job, status, outcome)
                created = []
                for rank in summary.missing:
                    _, was_created = await ensure(self.kube, build_pod(job, shape, rank), patch_drift=False)
                    if was_created:
                        created.append(rank)
            except (TemplateError, ChildConflictError) as exc:
                reason = "InvalidTemplate" if isinstance(exc, TemplateError) else "ChildConflict"
                return with_plan_failure(status, reason, str(exc), now=now, generation=generation), None
            if created:
                events.append(
                    Event("Normal", "PodsCreated", f"created {len(created)} pod(s) for attempt {attempt}")
                )
                jlog.info("created pods for node ranks %s (attempt %d)", created, attempt)

        status = with_pods(status, summary, now=now, generation=generation)
        status["attempt"] = attempt
        status.setdefault("restarts", 0)
        phase = status.get("phase")
        return status, (REQUEUE_RUNNING if phase == "Running" else REQUEUE_STARTING)

    def _plan(
        self, job: dict[str, Any], pods: list[dict[str, Any]], pins: dict[str, Any] | None = None
    ) -> PlanOutcome:
        """Inventory from the caches, then the planner; pins reproduce an earlier plan."""
        meta, spec = job["metadata"], job.get("spec") or {}
        res = spec.get("resources") or {}
        template_spec = (spec.get("template") or {}).get("spec") or {}
        selector = {**(template_spec.get("nodeSelector") or {}), **(res.get("nodeSelector") or {})}
        if res.get("gpuProduct"):
            selector[inventory.LABEL_GPU_PRODUCT] = res["gpuProduct"]
        gpu_resource = res.get("gpuResource") or "nvidia.com/gpu"
        nodes = inventory.gpu_nodes(
            self.view.nodes(),
            self.view.bound_pods(),
            gpu_resource=gpu_resource,
            node_selector=selector,
            tolerations=[*(template_spec.get("tolerations") or []), *(res.get("tolerations") or [])],
            exclude_job=meta["name"],
            exclude_namespace=meta["namespace"],
        )
        gpus: int | None = res.get("gpus")
        count: int | None = res.get("nodes")
        per: int | None = res.get("gpusPerNode")
        if pins:
            count, per = int(pins["nodes"]), int(pins["gpusPerNode"])
            gpus = count * per
        try:
            shape = inventory.choose_shape(
                nodes, gpus=gpus, node_count=count, gpus_per_node=per, gpu_resource=gpu_resource
            )
        except inventory.InventoryError as exc:
            return PlanOutcome(False, exc.reason, exc.message)
        return plan_job(spec, shape, pins)

    async def _ensure_shared_children(
        self, job: dict[str, Any], status: dict[str, Any], outcome: PlanOutcome | None
    ) -> None:
        """The Service and the layout ConfigMap, needed before any pod can start."""
        meta = job["metadata"]
        await ensure(self.kube, build_service(job))
        if outcome is None or outcome.document is None:
            try:
                await self.kube.get("v1", "ConfigMap", meta["namespace"], configmap_name(meta["name"]))
                return
            except KubeError as exc:
                if exc.status != 404:
                    raise
            # The ConfigMap vanished after planning: plan again pinned to the recorded layout,
            # which reproduces the same document.
            outcome = self._plan(job, [], pins=status["layout"])
            if outcome.document is None:
                raise ChildConflictError(
                    f"ConfigMap {configmap_name(meta['name'])} is missing and the recorded layout"
                    f" can no longer be planned: {outcome.message}"
                )
        await ensure(self.kube, build_configmap(job, outcome.document))
