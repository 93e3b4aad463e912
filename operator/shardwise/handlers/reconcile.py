"""The reconcile pass for one ParallelTrainingJob: read cached state, plan, apply children, patch status.

Driven by current state only, so it is idempotent: a pass that finds everything in place
changes nothing and writes nothing.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shardwise import gpu_queue, inventory, lifecycle, oom_replan, remediation
from shardwise.conditions import is_true, set_condition
from shardwise.jobstatus import (
    FAILED,
    PLANNED,
    RUNNING,
    SUSPENDED,
    Event,
    changed_events,
    checkpoint_shards,
    finished,
    needs_plan,
    planned_generation,
    status_patch,
    with_checkpoint,
    with_plan,
    with_plan_failure,
    with_pods,
)
from shardwise.kube.children import ChildConflictError, controller_uid, ensure
from shardwise.kube.client import Kube, KubeError
from shardwise.kube.events import post_event
from shardwise.metrics.analysis import ConditionValue
from shardwise.metrics.condition_values import STRAGGLER_DETECTED
from shardwise.metrics.progress import finished_progress
from shardwise.planning import PlanOutcome, plan_job
from shardwise.podstate import PodsSummary, summarize
from shardwise.resources import kueue, podgroup
from shardwise.resources.configmap import build_configmap
from shardwise.resources.names import (
    API_VERSION,
    KIND,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_NODE_RANK,
    configmap_name,
    pod_name,
    service_name,
)
from shardwise.resources.pods import PodShape, TemplateError, build_pod
from shardwise.resources.service import build_service

log = logging.getLogger(__name__)

JobKey = tuple[str, str]

# How long to wait before looking again when nothing will poke the job sooner.
REQUEUE_UNPLANNED = 60.0
REQUEUE_STARTING = 15.0
REQUEUE_RUNNING = 60.0
REQUEUE_TERMINATING = 1.0
# Workloads are not watched: a job waiting for Kueue looks again this often.
REQUEUE_QUEUED = 2.0


@dataclass(frozen=True)
class Stop:
    """A step decided the pass: stop here and look again after `requeue` seconds (None: on events)."""

    requeue: float | None


@dataclass
class ClusterView:
    """Read access to the operator's watch caches (kopf indexes): no API calls."""

    job: Callable[[JobKey], dict[str, Any] | None]
    jobs: Callable[[], list[dict[str, Any]]]
    nodes: Callable[[], list[dict[str, Any]]]
    # Live pods: bound ones hold GPUs on their node, unbound ones that request GPUs hold a claim.
    live_pods: Callable[[], list[dict[str, Any]]]
    job_pods: Callable[[JobKey], list[dict[str, Any]]]
    # The job's ConfigMaps and Services as the watch last saw them (kind, name, controller uid).
    job_children: Callable[[JobKey], list[dict[str, Any]]]
    # PriorityClass name -> value, and the globalDefault class's value (0 without one).
    priority_classes: Callable[[], tuple[dict[str, int], int]] = lambda: ({}, 0)


def _version(obj: dict[str, Any]) -> int:
    """resourceVersion as a number (etcd's revision), for telling which of two reads is newer."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _refused(exc: KubeError) -> bool:
    """The API server refused the object itself (quota, admission, validation): retrying the same
    request at once cannot help. A terminating namespace is left to the worker's own handling."""
    return 400 <= exc.status < 500 and exc.status != 409 and "NamespaceTerminating" not in exc.body


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
    # Called with (key, the job's uid, the status the pass left).
    on_pass: Callable[[JobKey, str, dict[str, Any]], None] | None = None
    restart_backoff_seconds: float = 10.0
    # Node label of the NVLink domain; pods prefer one domain when nodes carry it ("" disables).
    topology_label: str = "nvidia.com/gpu.clique"
    # The monitor's latest StragglerDetected / MemoryImbalanced findings for a running job.
    findings: Callable[[JobKey], tuple[ConditionValue, ...]] | None = None
    # The newest complete checkpoint (step, unix time) the monitor scraped from the trainer.
    checkpoints: Callable[[JobKey], tuple[int, float] | None] | None = None
    # What status.progress is to say (the monitor changes it at most once per progress interval).
    progress: Callable[[JobKey], dict[str, Any] | None] | None = None
    # The job as our last status write returned it: the watch cache may not have caught up yet,
    # and a pass that read an older status (an older attempt) would undo its own decisions.
    written: dict[JobKey, dict[str, Any]] = field(default_factory=dict)
    # A status a pass decided but has not written yet. Passes of different jobs interleave at
    # every await, so a plan must count against the inventory from the moment it is made (the
    # plan and this record happen with no await between them): no two jobs plan the same GPUs.
    decided: dict[JobKey, dict[str, Any]] = field(default_factory=dict)

    def all_jobs(self) -> list[dict[str, Any]]:
        """Every job as this operator last knew it: cache, our newer writes, decisions not written."""
        jobs: list[dict[str, Any]] = []
        for cached in self.view.jobs():
            key = gpu_queue.key_of(cached)
            job = self._latest(key) or cached
            if key in self.decided:
                job = {**job, "status": self.decided[key]}
            jobs.append(job)
        return jobs

    def priority(self, job: Mapping[str, Any]) -> int:
        """The value of the PriorityClass the job's pods name (the default class's when unnamed)."""
        classes, default = self.view.priority_classes()
        name = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get("priorityClassName")
        return classes.get(str(name), 0) if name else default

    def _latest(self, key: JobKey) -> dict[str, Any] | None:
        cached = self.view.job(key)
        ours = self.written.get(key)
        if cached is None:
            self.written.pop(key, None)
            return None
        if ours is not None and ours["metadata"].get("uid") == cached["metadata"].get("uid"):
            if _version(ours) > _version(cached):
                return ours
            del self.written[key]
        return cached

    async def reconcile(self, key: JobKey) -> float | None:
        """Bring one job a step closer to its desired state; returns seconds until the next look."""
        job = self._latest(key)
        if job is None or (job.get("metadata") or {}).get("deletionTimestamp"):
            return None
        # Read-only below but for status, which the pass deep-copies itself.
        job = {"apiVersion": API_VERSION, "kind": KIND, **job}
        pass_ = _Pass(self, job)
        try:
            requeue = await pass_.run()
            await pass_.commit()
        finally:
            self.decided.pop(key, None)
        if self.on_pass is not None:
            self.on_pass(key, str(job["metadata"].get("uid") or ""), pass_.status)
        return requeue


class _Pass:
    """The state of one reconcile pass: the job, the status being built, the Events to post."""

    def __init__(self, owner: Reconciler, job: dict[str, Any]) -> None:
        self.r = owner
        self.job = job
        self.meta: dict[str, Any] = job["metadata"]
        self.spec: dict[str, Any] = job.get("spec") or {}
        self.policy: dict[str, Any] = self.spec.get("runPolicy") or {}
        self.key: JobKey = (self.meta["namespace"], self.meta["name"])
        self.generation = int(self.meta.get("generation") or 1)
        self.now = owner.now()
        self.status: dict[str, Any] = copy.deepcopy(job.get("status") or {})
        self.written: dict[str, Any] = copy.deepcopy(self.status)
        self.events: list[Event] = []
        self._planned_outcome: PlanOutcome | None = None
        self.wake_after: float | None = None  # an earlier look than the phase's default
        self.log = JobLog(log, {"key": f"{self.key[0]}/{self.key[1]}"})
        # Submitted to a Kueue LocalQueue: Kueue decides when it runs (resume is the admission).
        self.queued_by_kueue = kueue.queue_name(job) is not None

    # -- writing ---------------------------------------------------------------------------------

    async def commit(self) -> None:
        """Patch status if it changed (one write per pass, or per committed decision) and post Events."""
        if self.status != self.written:
            updated = await self.r.kube.merge_patch(
                API_VERSION, KIND, self.key[0], self.key[1],
                {"status": status_patch(self.written, self.status)}, subresource="status",
            )  # fmt: skip
            if updated.get("metadata"):
                self.r.written[self.key] = updated
            self.r.decided.pop(self.key, None)
            self.log.info("status: phase %s, %s", self.status.get("phase"), self.status.get("message", ""))
        explicit = {e.reason for e in self.events}
        implied = [e for e in changed_events(self.written, self.status) if e.reason not in explicit]
        await asyncio.gather(
            *(
                post_event(self.r.kube, self.job, e.type, e.reason, e.message)
                for e in [*implied, *self.events]
            )
        )
        self.written = copy.deepcopy(self.status)
        self.events = []

    def condition(self, ctype: str, value: bool, reason: str, message: str) -> None:
        self.status["conditions"] = set_condition(
            self.status.get("conditions") or [], ctype, value, reason, message,
            now=self.now, generation=self.generation,
        )  # fmt: skip

    def wake(self, seconds: float) -> None:
        """Ask for a pass no later than that (at least a second from now)."""
        due = max(1.0, seconds)
        self.wake_after = due if self.wake_after is None else min(self.wake_after, due)

    def finish_failed(self, reason: str, message: str) -> None:
        self.condition(RUNNING, False, reason, message)
        self.condition(FAILED, True, reason, message)
        self.status["phase"] = "Failed"
        self.status["message"] = message
        self.status.setdefault("completionTime", self.now)
        self.status.pop("nextAttemptTime", None)

    # -- the pass ----------------------------------------------------------------------------------

    async def run(self) -> float | None:
        # Only pods this job controls: a pod that merely carries the job's labels (copied by
        # hand, or another controller's) is neither counted nor ever deleted.
        uid = self.meta.get("uid")
        pods = [p for p in self.r.view.job_pods(self.key) if controller_uid(p) == uid]
        if finished(self.status):
            return await self._finished(pods)
        self.status["observedGeneration"] = self.generation

        if self.policy.get("suspend"):
            return await self._suspend(pods)
        if is_true(self.status.get("conditions") or [], SUSPENDED) and not self.queued_by_kueue:
            # Resumed: a fresh attempt, not a restart; the deadline clock starts again.
            self.condition(SUSPENDED, False, "Resumed", "the job was resumed")
            self.status["attempt"] = int(self.status.get("attempt") or 0) + 1
            self.status.pop("startTime", None)
            self.status.pop("nextAttemptTime", None)

        if lifecycle.deadline_passed(self.policy, self.status.get("startTime"), self.now):
            limit = self.policy.get("activeDeadlineSeconds")
            self.finish_failed("DeadlineExceeded", f"the job ran longer than activeDeadlineSeconds={limit}")
            await self.commit()
            await self._delete_live(pods)
            return None

        deadline = int(self.policy.get("activeDeadlineSeconds") or 0)
        if deadline and self.status.get("startTime"):
            # Look again exactly when the deadline falls, not at the next routine requeue.
            elapsed = lifecycle.seconds_between(self.status["startTime"], self.now)
            self.wake(deadline - elapsed)

        attempt = int(self.status.get("attempt") or 0)
        stale = [p for p in pods if (p["metadata"].get("labels") or {}).get(LABEL_ATTEMPT) != str(attempt)]
        if stale:
            # Pods keep fixed names, so a new attempt waits until the old one's pods are gone; a
            # pod on a lost node would keep its name forever (no kubelet confirms its end).
            await self.commit()
            await self._delete(stale, force_lost=True)
            return REQUEUE_TERMINATING

        # Planned after the backoff: the next attempt's plan sees the inventory it will start on,
        # and a plan recorded in status is always written to the ConfigMap in the same pass.
        wait = self._backoff_wait()
        if wait is not None:
            return wait

        if needs_plan(self.status, self.generation, attempt_started=bool(pods)):
            outcome = self._plan()
            if not outcome.feasible or outcome.layout_status is None:
                self.log.info("not planned: %s: %s", outcome.reason, outcome.message)
                self.status = with_plan_failure(
                    self.status, outcome.reason, outcome.message, now=self.now, generation=self.generation
                )
                return REQUEUE_UNPLANNED
            self.status = with_plan(
                self.status, outcome.layout_status, outcome.message, now=self.now, generation=self.generation
            )
            self.r.decided[self.key] = self.status
            self.log.info("planned %s", outcome.layout_status.get("summary"))
            self._planned_outcome = outcome

        if pods and self._children_missing():
            # Deleted under a running attempt: restored now, not at the next restart (a pod that
            # is still to start needs the ConfigMap volume, the rendezvous needs the Service).
            try:
                await self._ensure_shared_children(self._planned_outcome)
            except ChildConflictError as exc:
                self.status = with_plan_failure(
                    self.status, "ChildConflict", str(exc), now=self.now, generation=self.generation
                )
                return None

        layout = self.status["layout"]
        shape = PodShape(
            nodes=int(layout["nodes"]),
            gpus_per_node=int(layout["gpusPerNode"]),
            attempt=attempt,
            gpu_resource=(self.spec.get("resources") or {}).get("gpuResource") or "nvidia.com/gpu",
            excluded_nodes=tuple(sorted(remediation.excluded_names(self.status))),
            gpu_product=layout.get("gpuProduct") or None,
            host_memory_bytes=int(layout.get("hostMemoryBytes") or 0),
        )
        summary = summarize(pods, expected=shape.nodes, attempt=attempt)

        if self.queued_by_kueue:
            stop = await self._kueue_gate(shape, pods)
            if stop is not None:
                return stop.requeue

        for step in (self._failures, self._gang_timeout):
            stop = await step(summary, pods)
            if stop is not None:
                return stop.requeue

        if summary.missing:
            if summary.present and is_true(self.status.get("conditions") or [], RUNNING):
                # A pod of a started gang (all its pods ran) vanished: deleted, its node gone.
                # torchrun cannot take a lone replacement, so the whole gang restarts, without
                # spending the budget. A rank of a gang that never ran complete is created instead.
                why = f"pod(s) of node rank {summary.missing} disappeared"
                return (await self._restart(pods, "disruption", why)).requeue
            stop = await self._create_pods(shape, summary, pods)
            if stop is not None:
                return stop.requeue

        self.status = with_pods(self.status, summary, now=self.now, generation=self.generation)
        findings = self.r.findings(self.key) if self.r.findings else ()
        replacement = remediation.decide(
            self.spec.get("monitoring") or {}, findings, self.status, [n for _, n in summary.nodes]
        )
        for finding in findings:
            message = finding.message
            if replacement.refused and finding.type == STRAGGLER_DETECTED and finding.status:
                message = f"{message} {replacement.refused}."
            self.condition(finding.type, finding.status, finding.reason, message)
        if replacement.nodes and summary.all_running:
            return (await self._replace_stragglers(pods, replacement.nodes, findings)).requeue
        if self.r.checkpoints is not None:
            self.status = with_checkpoint(self.status, self.r.checkpoints(self.key), attempt=attempt)
        progress = self.r.progress(self.key) if self.r.progress is not None else None
        if progress is not None:
            self.status["progress"] = progress
        if self.status.get("phase") == "Succeeded" and self.status.get("progress"):
            self.status["progress"] = finished_progress(self.status["progress"], self.now)
        self.status["attempt"] = attempt
        self.status.setdefault("restarts", 0)
        if summary.all_running:
            self.status.pop("scheduleFailures", None)
            self.status.pop("createFailures", None)
        requeue = REQUEUE_RUNNING if self.status.get("phase") == "Running" else REQUEUE_STARTING
        return min(requeue, self.wake_after) if self.wake_after is not None else requeue

    # -- steps ---------------------------------------------------------------------------------------

    def _children_missing(self) -> bool:
        """The Service or the layout ConfigMap is gone from the watch cache."""
        uid = self.meta.get("uid")
        have = {
            (c.get("kind"), c.get("name"))
            for c in self.r.view.job_children(self.key)
            if c.get("owner") == uid
        }
        wanted = {("Service", service_name(self.key[1])), ("ConfigMap", configmap_name(self.key[1]))}
        return not wanted <= have

    def _backoff_wait(self) -> float | None:
        due = self.status.get("nextAttemptTime")
        if not due:
            return None
        remaining = lifecycle.seconds_between(self.now, due)
        if remaining > 0:
            return remaining
        self.status.pop("nextAttemptTime", None)
        return None

    async def _finished(self, pods: list[dict[str, Any]]) -> float | None:
        """A finished job keeps its pods for their logs, but frees GPUs still held; then its TTL."""
        await self._delete_live(pods)
        if self.queued_by_kueue:
            await self._kueue_finished()
        remaining = lifecycle.ttl_remaining(self.policy, self.status.get("completionTime"), self.now)
        if remaining is None:
            return None
        if remaining > 0:
            return remaining
        self.log.info(
            "deleting: ttlSecondsAfterFinished=%s passed", self.policy.get("ttlSecondsAfterFinished")
        )
        await self.r.kube.delete(API_VERSION, KIND, self.key[0], self.key[1], uid=self.meta.get("uid"))
        return None

    async def _suspend(self, pods: list[dict[str, Any]]) -> float | None:
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        self.condition(
            SUSPENDED, True, "Suspended", "spec.runPolicy.suspend is true: the job's pods are deleted"
        )
        self.condition(RUNNING, False, "Suspended", "the job is suspended")
        self.status["phase"] = "Suspended"
        self.status["message"] = "suspended"
        self.status.pop("nextAttemptTime", None)
        await self.commit()
        await self._delete(live)
        return REQUEUE_TERMINATING if pods else None

    async def _workload(self) -> dict[str, Any] | None:
        try:
            return await self.r.kube.get(
                kueue.KUEUE_API_VERSION, kueue.WORKLOAD_KIND, self.key[0], kueue.workload_name(self.key[1])
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def _priority(self) -> tuple[int | None, str | None]:
        """The WorkloadPriorityClass named by the job's label, resolved as Kueue's job reconciler does."""
        name = (self.meta.get("labels") or {}).get(kueue.PRIORITY_LABEL)
        if not name:
            return None, None
        try:
            wpc = await self.r.kube.get(kueue.KUEUE_API_VERSION, "WorkloadPriorityClass", None, name)
        except KubeError as exc:
            if exc.status != 404:
                raise
            return None, None
        return int(wpc.get("value") or 0), name

    async def _kueue_gate(self, shape: PodShape, pods: list[dict[str, Any]]) -> Stop | None:
        """Hold the job until Kueue admits its Workload; on eviction free the GPUs, spend nothing.

        Kueue's external-framework contract: the operator creates the Workload (one pod set,
        one pod per node, the planned requests), Kueue reserves quota and admits it; the pods
        then start with the admitted ResourceFlavors' node labels and tolerations. An eviction
        (preemption, a stopped queue) deletes the pods, then hands the quota back by clearing
        the admission; the job resumes as a new attempt, never as a restart.
        """
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        workload = await self._workload()
        if workload is None:
            try:
                pod = build_pod(self.job, shape, 0)
            except TemplateError as exc:
                return self._child_failure(exc)
            priority, priority_class = await self._priority()
            built = kueue.build_workload(
                self.job, pod, shape.nodes, priority=priority, priority_class=priority_class
            )
            try:
                workload = await self.r.kube.create(built)
            except KubeError as exc:
                if exc.status != 409:
                    raise
                return Stop(REQUEUE_TERMINATING)
            self.log.info(
                "created Workload %s in LocalQueue %s",
                kueue.workload_name(self.key[1]),
                kueue.queue_name(self.job),
            )
        if kueue.pod_set_count(workload) != shape.nodes:
            # Re-planned for another node count (a lost node): the Workload asks for the old gang.
            # A Workload's pod sets are immutable, so it is replaced; the new one queues afresh.
            self.log.info(
                "replacing Workload %s: the plan now has %d node(s)",
                workload["metadata"]["name"],
                shape.nodes,
            )
            await self.commit()
            await self._delete(live)
            await self.r.kube.delete(
                kueue.KUEUE_API_VERSION, kueue.WORKLOAD_KIND, self.key[0], workload["metadata"]["name"],
                uid=workload["metadata"].get("uid"),
            )  # fmt: skip
            return Stop(REQUEUE_TERMINATING)
        adm = kueue.admission(workload)
        conditions = self.status.get("conditions") or []
        if adm.state == "Admitted":
            self.condition(kueue.ADMITTED, True, "Admitted", f"Kueue: {adm.message}")
            if is_true(conditions, SUSPENDED):
                self.condition(SUSPENDED, False, "Admitted", f"Kueue admitted the job: {adm.message}")
                if self.status.get("startTime"):
                    # Re-admitted after an eviction: a fresh attempt, not a restart.
                    self.status["attempt"] = int(self.status.get("attempt") or 0) + 1
                    self.status.pop("startTime", None)
                    self.status.pop("nextAttemptTime", None)
                    await self.commit()
                    return Stop(REQUEUE_TERMINATING)
            flavors = []
            for name in sorted(set(adm.flavors.values())):
                flavors.append(await self.r.kube.get(kueue.KUEUE_API_VERSION, "ResourceFlavor", None, name))
            selector, tolerations = kueue.flavor_placement(flavors)
            self.job = kueue.with_placement(self.job, selector, tolerations)
            return None
        evicted = adm.state == "Evicted"
        reason = "EvictedByKueue" if evicted else "QueuedByKueue"
        message = f"Kueue: {adm.reason}: {adm.message}".rstrip(": ")
        self.condition(kueue.ADMITTED, False, adm.reason, message)
        self.condition(SUSPENDED, True, reason, message)
        self.condition(RUNNING, False, reason, message)
        self.status["phase"] = "Suspended" if self.status.get("startTime") else "Queued"
        self.status["message"] = message
        if live:
            self.log.info("Workload not admitted (%s): deleting %d pod(s)", adm.reason, len(live))
            self.events.append(Event("Normal", reason, f"{message}; the job's pods are deleted"))
        await self.commit()
        await self._delete(live)
        if evicted and not pods:
            # Pods gone: give the quota back so Kueue can queue (and later re-admit) the Workload.
            await self.r.kube.merge_patch(
                kueue.KUEUE_API_VERSION, kueue.WORKLOAD_KIND, self.key[0], workload["metadata"]["name"],
                {"status": kueue.release_status(workload, self.now)}, subresource="status",
            )  # fmt: skip
        return Stop(REQUEUE_TERMINATING if pods else REQUEUE_QUEUED)

    async def _kueue_finished(self) -> None:
        """A finished job's Workload is marked Finished, so Kueue releases its quota."""
        workload = await self._workload()
        if workload is None or kueue.is_finished(workload):
            return
        succeeded = self.status.get("phase") == "Succeeded"
        message = str(self.status.get("message") or self.status.get("phase") or "finished")
        await self.r.kube.merge_patch(
            kueue.KUEUE_API_VERSION, kueue.WORKLOAD_KIND, self.key[0], workload["metadata"]["name"],
            {"status": kueue.finished_status(workload, succeeded, message, self.now)}, subresource="status",
        )  # fmt: skip

    async def _failures(self, summary: PodsSummary, pods: list[dict[str, Any]]) -> Stop | None:
        """Failed or disrupted pods: fail the job, or tear the gang down for a new attempt."""
        verdicts = [lifecycle.classify(f, self.policy) for f in summary.failures]
        lost = self._lost_nodes(summary)
        if summary.disrupted or lost:
            why = (
                f"pod(s) {', '.join(summary.disrupted)} are being disrupted"
                if summary.disrupted
                else f"node(s) {', '.join(sorted(lost))} are gone or NotReady"
            )
            verdicts.append(lifecycle.FailureVerdict("disruption", None, why))
        if not verdicts:
            return None
        verdict = lifecycle.worst(verdicts)
        place = ""
        if summary.failures:
            first = summary.failures[0]
            code = lifecycle.effective_exit_code(first)
            place = f"pod {first.pod}" + (f" on node {first.node}" if first.node else "")
            place += f" exited with code {code}" if code is not None else f" failed ({first.reason})"
        where = f"{place}: {verdict.why}" if place else verdict.why
        if verdict.verdict == "permanent":
            reason = "TrainerExitedWithError" if verdict.exit_code is not None else "PodFailed"
            # The reason of a failure that made the verdict permanent: a pod whose peers died
            # because of it reports only a (retryable) communication error.
            permanent = [
                f for f, v in zip(summary.failures, verdicts, strict=False) if v.verdict == "permanent"
            ]
            told = next((t for t in map(lifecycle.trainer_reason, permanent) if t), None)
            if told is not None:  # the trainer named it (bad model, unsupported layout, …)
                reason, said = told
                where = f"{place}: {said}" if said else where
            if reason == oom_replan.REASON_GPU_OOM:
                if oom_replan.may_replan(self.status):
                    oom = next(f for f in permanent if lifecycle.trainer_reason(f))
                    return await self._oom_replan(pods, where, lifecycle.trainer_gpu_memory_needed(oom))
                where += "; out of memory again after the one out-of-memory re-plan"
            self.finish_failed(reason, where)
            await self.commit()
            await self._delete_live(pods)
            return Stop(None)
        return await self._restart(pods, verdict.verdict, where, replan=bool(lost))

    async def _replace_stragglers(
        self, pods: list[dict[str, Any]], nodes: tuple[str, ...], findings: tuple[ConditionValue, ...]
    ) -> Stop:
        """stragglerPolicy Replace: exclude the straggler's node, then a new attempt on the other
        GPUs (the same shape on a spare node, else re-planned for what is left) that resumes from
        the latest checkpoint. Spends the straggler budget, not the restart budget."""
        said = next(f.message for f in findings if f.type == STRAGGLER_DETECTED and f.status)
        self.status = remediation.with_excluded(
            self.status, nodes, reason=remediation.EXCLUDED_STRAGGLER, message=said, now=self.now
        )
        used = remediation.replacements_used(self.status)
        limit = int((self.spec.get("monitoring") or {}).get("maxStragglerReplacements", 1))
        why = f"straggler on node(s) {', '.join(nodes)} excluded (stragglerPolicy Replace, {used}/{limit})"
        self.events.append(Event("Warning", "StragglerReplaced", f"{why}: {said}"))
        # The finding was about the attempt that is going: the next one is judged afresh.
        self.condition(
            STRAGGLER_DETECTED, False, "StragglerReplaced", f"{why}; the next attempt is judged afresh"
        )
        return await self._restart(pods, "straggler", why, replan=True)

    async def _oom_replan(self, pods: list[dict[str, Any]], where: str, needed: int | None) -> Stop:
        """Out of GPU memory: plan again with the measured peak as the floor (once per job), so
        the failed layout no longer fits; the next attempt starts on the new plan, or the job
        fails with the planner's diagnosis when nothing fits."""
        attempt = int(self.status.get("attempt") or 0)
        record = oom_replan.correction_record(self.status.get("layout") or {}, needed, attempt)
        if record is None:
            self.finish_failed(oom_replan.REASON_GPU_OOM, where)
            await self.commit()
            await self._delete_live(pods)
            return Stop(None)
        self.status["memoryCorrection"] = record
        outcome = self._plan()
        if not outcome.feasible or outcome.layout_status is None:
            message = oom_replan.infeasible_message(where, record, outcome.reason, outcome.message)
            self.finish_failed(oom_replan.REASON_GPU_OOM, message)
            await self.commit()
            await self._delete_live(pods)
            return Stop(None)
        message = oom_replan.replan_message(where, record, outcome.layout_status)
        self.condition(oom_replan.REPLANNED, True, oom_replan.REASON_OOM_REPLAN, message)
        # The next attempt's pass plans again (with the correction) and writes its ConfigMap.
        self.status.pop("layout", None)
        self.condition(
            PLANNED,
            False,
            "Replanning",
            f"out of memory: re-planning with predictions x{record['factor']:.3f}",
        )
        return await self._restart(pods, "retryable", message)

    def _lost_nodes(self, summary: PodsSummary) -> set[str]:
        return self._lost({node_name for _, node_name in summary.nodes})

    def _lost(self, node_names: set[str]) -> set[str]:
        """Of these nodes, those gone from the cache or not Ready."""
        known = {(n.get("metadata") or {}).get("name"): n for n in self.r.view.nodes()}
        lost: set[str] = set()
        for node_name in node_names:
            node = known.get(node_name)
            ready = node is not None and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (node.get("status") or {}).get("conditions") or []
            )
            if not ready:
                lost.add(node_name)
        return lost

    async def _restart(
        self, pods: list[dict[str, Any]], kind: str, why: str, *, replan: bool = False
    ) -> Stop:
        """New attempt: status first (so a crash never double-counts), then the old pods go."""
        restarts = int(self.status.get("restarts") or 0)
        limit = int(self.policy.get("maxRestarts", 3))
        budgeted = kind not in ("disruption", "straggler")  # neither is the job's fault
        if budgeted:
            if restarts >= limit:
                self.finish_failed(
                    "BackoffLimitExceeded", f"{why}; restart budget spent ({restarts}/{limit})"
                )
                await self.commit()
                await self._delete_live(pods)
                return Stop(None)
            restarts += 1
        attempt = int(self.status.get("attempt") or 0) + 1
        delay = lifecycle.backoff_seconds(max(1, restarts), self.r.restart_backoff_seconds)
        if not budgeted:
            delay = 0.0
        self.status["restarts"] = restarts
        self.status["attempt"] = attempt
        self.status["nextAttemptTime"] = lifecycle.add_seconds(self.now, delay)
        self.status["phase"] = "Restarting"
        label = f"restart {restarts}/{limit}" if budgeted else f"{kind} (restart budget not spent)"
        message = f"{why}; {label}; attempt {attempt} starts in {delay:.0f}s from the latest checkpoint"
        self.status["message"] = message
        self.condition(RUNNING, False, "Restarting", message)
        self.events.append(Event("Warning", "Restarting", message))
        if replan and self.policy.get("replanOnNodeLoss", True) and not self._old_shape_fits():
            self.status.pop("layout", None)
            self.condition(
                PLANNED, False, "Replanning", f"{why}: the planned layout no longer fits; re-planning"
            )
        await self.commit()
        self.log.info("restarting: %s", message)
        await self._delete(pods, force_lost=True)
        return Stop(REQUEUE_TERMINATING)

    def _old_shape_fits(self) -> bool:
        layout = self.status.get("layout") or {}
        try:
            self._shape(int(layout["nodes"]), int(layout["gpusPerNode"]), None)
        except (KeyError, inventory.InventoryError):
            return False
        return True

    async def _gang_timeout(self, summary: PodsSummary, pods: list[dict[str, Any]]) -> Stop | None:
        """All pods start together or not at all: release an attempt stuck in scheduling."""
        timeout = int(self.policy.get("scheduleTimeoutSeconds", 300) or 0)
        unscheduled = len(summary.pending) - len([n for n in summary.nodes if n[0] in summary.pending])
        if not timeout or not summary.first_created or summary.missing or unscheduled <= 0:
            return None
        waited = lifecycle.seconds_between(summary.first_created, self.now)
        if waited < timeout:
            # Not decided yet: the pass goes on, but must look again when the timeout is due.
            self.wake(timeout - waited)
            return None
        failures = int(self.status.get("scheduleFailures") or 0) + 1
        delay = lifecycle.backoff_seconds(failures, self.r.restart_backoff_seconds)
        names = ", ".join(summary.unschedulable or summary.pending)
        message = (
            f"not all pods were scheduled within scheduleTimeoutSeconds={timeout} ({names}"
            f"{': ' + summary.scheduler_message if summary.scheduler_message else ''}); "
            f"released, retry {failures} in {delay:.0f}s"
        )
        self.status["scheduleFailures"] = failures
        self.status["attempt"] = int(self.status.get("attempt") or 0) + 1
        self.status["nextAttemptTime"] = lifecycle.add_seconds(self.now, delay)
        self.status["phase"] = "Pending"
        self.status["message"] = message
        self.condition(RUNNING, False, "GangScheduleTimeout", message)
        await self.commit()
        await self._delete([p for p in pods if not p["metadata"].get("deletionTimestamp")])
        return Stop(REQUEUE_TERMINATING)

    async def _create_pods(
        self, shape: PodShape, summary: PodsSummary, pods: list[dict[str, Any]]
    ) -> Stop | None:
        """Create the missing ranks; a rank the API server refuses fails the whole attempt."""
        gang = podgroup.gang_spec(self.job)
        try:
            await self._ensure_shared_children(self._planned_outcome)
            # Looked up only here: the only pass that needs it is one that creates pods.
            placed = dataclasses.replace(shape, topology_key=self._topology_key())
            built = [build_pod(self.job, placed, rank) for rank in summary.missing]
            if gang is not None:
                # The group first: a gang scheduler holds member pods until minMember are placeable.
                gpus = {shape.gpu_resource: str(shape.nodes * shape.gpus_per_node)}
                await ensure(self.r.kube, podgroup.build_podgroup(self.job, gang, shape.nodes, gpus))
                built = [podgroup.with_gang(pod, self.key[1], gang) for pod in built]
        except (TemplateError, ChildConflictError) as exc:
            return self._child_failure(exc)
        results = await asyncio.gather(
            *(ensure(self.r.kube, pod, patch_drift=False) for pod in built), return_exceptions=True
        )
        made: list[dict[str, Any]] = []
        refused: list[tuple[int, KubeError]] = []
        for rank, result in zip(summary.missing, results, strict=True):
            if isinstance(result, ChildConflictError):
                return self._child_failure(result)
            if isinstance(result, KubeError) and _refused(result):
                refused.append((rank, result))
            elif isinstance(result, BaseException):
                raise result
            elif result[1]:
                made.append(result[0])
        if refused:
            return await self._creation_failed(shape, refused, [*pods, *made])
        if made:
            ranks = sorted(int(p["metadata"]["labels"][LABEL_NODE_RANK]) for p in made)
            self.events.append(
                Event("Normal", "PodsCreated", f"created {len(made)} pod(s) for attempt {shape.attempt}")
            )
            self.log.info("created pods for node ranks %s (attempt %d)", ranks, shape.attempt)
        return None

    def _child_failure(self, exc: Exception) -> Stop:
        reason = "InvalidTemplate" if isinstance(exc, TemplateError) else "ChildConflict"
        self.status = with_plan_failure(
            self.status, reason, str(exc), now=self.now, generation=self.generation
        )
        return Stop(None)

    async def _creation_failed(
        self, shape: PodShape, refused: list[tuple[int, KubeError]], pods: list[dict[str, Any]]
    ) -> Stop:
        """A refused rank (quota, admission webhook, invalid pod): the attempt is released, its pods
        deleted (a partial gang never holds GPUs while it waits), and retried with jittered backoff.
        """
        failures = int(self.status.get("createFailures") or 0) + 1
        delay = lifecycle.jittered(
            lifecycle.backoff_seconds(failures, self.r.restart_backoff_seconds), random.random()
        )
        rank, exc = refused[0]
        more = f" ({len(refused) - 1} more refused)" if len(refused) > 1 else ""
        message = (
            f"the API server refused pod {pod_name(self.key[1], rank)} (HTTP {exc.status}): "
            f"{exc.message}{more}; attempt {shape.attempt} released, retry {failures} in {delay:.0f}s"
        )
        self.status["createFailures"] = failures
        self.status["attempt"] = shape.attempt + 1
        self.status["nextAttemptTime"] = lifecycle.add_seconds(self.now, delay)
        self.status["phase"] = "Pending"
        self.status["message"] = message
        self.condition(RUNNING, False, "PodCreateFailed", message)
        self.events.append(Event("Warning", "PodCreateFailed", message))
        await self.commit()
        self.log.info("pod creation refused: %s", message)
        await self._delete(list({p["metadata"]["name"]: p for p in pods}.values()))
        return Stop(REQUEUE_TERMINATING)

    async def _delete(self, pods: list[dict[str, Any]], *, force_lost: bool = False) -> None:
        """Delete gracefully; with force_lost, pods on a lost node (gone or NotReady) are
        force-deleted, Terminating or not: no kubelet will ever confirm their end."""
        nodes = {str(p["spec"]["nodeName"]) for p in pods if (p.get("spec") or {}).get("nodeName")}
        lost = self._lost(nodes) if force_lost else set()
        for pod in pods:
            meta = pod["metadata"]
            node = (pod.get("spec") or {}).get("nodeName")
            if node in lost:
                gone = await self.r.kube.delete(
                    "v1", "Pod", meta["namespace"], meta["name"], uid=meta.get("uid"), grace_period_seconds=0
                )
                if gone:
                    message = (
                        f"pod {meta['name']} was force-deleted: its node {node} is gone or NotReady,"
                        " so no kubelet would confirm its end and the next attempt needs its name"
                    )
                    self.log.info("%s", message)
                    await post_event(self.r.kube, self.job, "Warning", "PodForceDeleted", message)
                continue
            if meta.get("deletionTimestamp"):
                continue
            await self.r.kube.delete("v1", "Pod", meta["namespace"], meta["name"], uid=meta.get("uid"))

    async def _delete_live(self, pods: list[dict[str, Any]]) -> None:
        """Free the GPUs of pods still running; finished pods stay for their logs."""
        await self._delete(
            [p for p in pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
        )

    # -- planning ------------------------------------------------------------------------------------

    def _eligible(self) -> tuple[list[inventory.NodeGpus], str]:
        """Nodes that match the job's placement, with their free GPUs: its own pods excluded, what
        other jobs' plans and other workloads' unbound pods hold set aside."""
        where = gpu_queue.placement(self.spec)
        excluded = remediation.excluded_names(self.status)
        all_nodes = self.r.view.nodes()
        pods = self.r.view.live_pods()
        claims = [
            *gpu_queue.plan_claims(
                self.r.all_jobs(), all_nodes, pods, gpu_resource=where.gpu_resource, skip=self.key
            ),
            *inventory.unbound_pod_claims(
                pods, all_nodes, gpu_resource=where.gpu_resource, skip_label=LABEL_JOB
            ),
        ]
        nodes = inventory.gpu_nodes(
            [n for n in all_nodes if (n.get("metadata") or {}).get("name") not in excluded],
            # Under Kueue the quota is Kueue's to account: plan on the nodes' capacity.
            [] if self.queued_by_kueue else pods,
            gpu_resource=where.gpu_resource,
            node_selector=where.selector,
            tolerations=where.tolerations,
            exclude_job=self.meta["name"],
            exclude_namespace=self.meta["namespace"],
            claims=[] if self.queued_by_kueue else claims,
        )
        return nodes, where.gpu_resource

    def _topology_key(self) -> str | None:
        """The NVLink-domain label, when any node the job could use carries it."""
        label = self.r.topology_label
        if not label:
            return None
        where = gpu_queue.placement(self.spec)
        usable = gpu_queue.eligible_names(self.r.view.nodes(), where)
        for node in self.r.view.nodes():
            meta = node.get("metadata") or {}
            if meta.get("name") in usable and label in (meta.get("labels") or {}):
                return label
        return None

    def _shape(self, count: int | None, per: int | None, gpus: int | None) -> inventory.Shape:
        nodes, gpu_resource = self._eligible()
        return inventory.choose_shape(
            nodes, gpus=gpus, node_count=count, gpus_per_node=per, gpu_resource=gpu_resource
        )

    def _plan(self, pins: dict[str, Any] | None = None) -> PlanOutcome:
        """Inventory from the caches, then the planner; pins reproduce an earlier plan."""
        res = self.spec.get("resources") or {}
        gpus: int | None = res.get("gpus")
        count: int | None = res.get("nodes")
        per: int | None = res.get("gpusPerNode")
        if pins:
            count, per = int(pins["nodes"]), int(pins["gpusPerNode"])
            gpus = count * per
        correction = oom_replan.current_correction(self.status)
        held = checkpoint_shards(self.status)  # a re-plan keeps the checkpoint's TP / PP
        if not pins and not self.queued_by_kueue:  # under Kueue the queue is Kueue's
            queued = self._queued(count, per, gpus)
            if queued is not None:
                return queued
        try:
            shape = self._shape(count, per, gpus)
        except inventory.InventoryError as exc:
            if pins or not self.status.get("startTime") or not self.policy.get("replanOnNodeLoss", True):
                return PlanOutcome(False, exc.reason, exc.message)
            # The job ran before and lost GPUs: plan for what is left.
            try:
                shape = self._fewer(count, per, gpus)
            except inventory.InventoryError:
                return PlanOutcome(False, exc.reason, exc.message)
            outcome = plan_job(self.spec, shape, None, memory_correction=correction, checkpoint_shards=held)
            if outcome.feasible:
                lost = f"lost GPUs: re-planned for {shape.nodes}×{shape.gpus_per_node}"
                self.events.append(Event("Warning", "Replanned", f"{lost}: {outcome.message}"))
            return outcome
        return plan_job(self.spec, shape, pins, memory_correction=correction, checkpoint_shards=held)

    def _queued(self, count: int | None, per: int | None, gpus: int | None) -> PlanOutcome | None:
        """FIFO within PriorityClass order: a job waits while an earlier one waits for its nodes."""
        jobs = self.r.all_jobs()
        ahead = gpu_queue.ahead_in_queue(self.job, jobs, self.r.view.nodes(), self.r.priority)
        if not ahead:
            return None
        nodes, gpu_resource = self._eligible()
        more = f" and {len(ahead) - 1} more" if len(ahead) > 1 else ""
        message = (
            f"the job needs {inventory.describe_request(gpus, count, per)} but the matching nodes have"
            f" {sum(n.free for n in nodes)} free {gpu_resource};"
            f" waiting in the queue behind {ahead[0][0]}/{ahead[0][1]}{more}, which come first"
            " (PriorityClass value, then creation time) and wait for the same nodes"
        )
        return PlanOutcome(False, "InsufficientGpus", message)

    def _fewer(self, count: int | None, per: int | None, gpus: int | None) -> inventory.Shape:
        """After losing nodes: the same GPUs per node on fewer nodes, or else a smaller total."""
        nodes, gpu_resource = self._eligible()
        if per:
            fitting = len([n for n in nodes if n.free >= per])
            if fitting:
                return inventory.choose_shape(
                    nodes, gpus=None, node_count=min(fitting, count or fitting), gpus_per_node=per,
                    gpu_resource=gpu_resource,
                )  # fmt: skip
        want = (gpus or (count or 0) * (per or 0)) // 2
        while want >= 1:
            try:
                return inventory.choose_shape(
                    nodes, gpus=want, node_count=None, gpus_per_node=None, gpu_resource=gpu_resource
                )
            except inventory.InventoryError:
                want //= 2
        raise inventory.InventoryError("InsufficientGpus", "no GPUs left")

    async def _ensure_shared_children(self, outcome: PlanOutcome | None) -> None:
        """The Service and the layout ConfigMap, needed before any pod can start.

        With this pass's plan, the ConfigMap is written from it (patched if it holds another):
        the document and status.layout always come from the same plan.
        """
        if outcome is not None and outcome.document is not None:
            await asyncio.gather(
                ensure(self.r.kube, build_service(self.job)),
                ensure(self.r.kube, build_configmap(self.job, outcome.document)),
            )
            return
        await ensure(self.r.kube, build_service(self.job))
        try:
            await self.r.kube.get("v1", "ConfigMap", self.key[0], configmap_name(self.key[1]))
            return
        except KubeError as exc:
            if exc.status != 404:
                raise
        # The ConfigMap vanished after planning: plan again pinned to the recorded layout, which
        # reproduces the same document while the spec is the one it was planned for.
        outcome = self._plan(pins=self.status["layout"])
        if outcome.document is None or outcome.layout_status is None:
            raise ChildConflictError(
                f"ConfigMap {configmap_name(self.key[1])} is missing and the recorded layout"
                f" can no longer be planned: {outcome.message}"
            )
        if planned_generation(self.status) != self.generation:
            # The spec changed since: the restored document is this spec's, so is status.layout.
            self.status = with_plan(
                self.status, outcome.layout_status, outcome.message, now=self.now, generation=self.generation
            )
        await ensure(self.r.kube, build_configmap(self.job, outcome.document))
