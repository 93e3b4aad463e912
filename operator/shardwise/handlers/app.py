"""kopf wiring: watch caches (indexes), event handlers that enqueue jobs, and the reconcile workers.

Design: kopf provides watching, indexes, login and the liveness probe; the reconcile runs in our
own keyed work queue rather than in kopf's change handlers. So there are no finalizers (a job
stays deletable while the operator is down), no per-handler progress bookkeeping in the object,
bursts of events coalesce into one pass, and passes of one job never overlap.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import kopf

from shardwise import inventory, lifecycle
from shardwise.handlers.monitor import Monitor
from shardwise.handlers.reconcile import ClusterView, JobKey, Reconciler
from shardwise.handlers.workqueue import WorkQueue
from shardwise.jobstatus import finished
from shardwise.kube.children import controller_uid
from shardwise.kube.client import Kube, KubeError
from shardwise.metrics.exporter import JobMetricsExporter
from shardwise.metrics.operator_metrics import OperatorMetrics
from shardwise.metrics.progress import DEFAULT_PROGRESS_INTERVAL_SECONDS
from shardwise.metrics.scrape import DEFAULT_STATS_MAX_BYTES
from shardwise.resources.names import GROUP, LABEL_JOB, PLURAL, VERSION

log = logging.getLogger(__name__)


def _plain(body: Any) -> dict[str, Any]:
    # A shallow copy is enough: each watch event carries a freshly decoded body that nobody
    # mutates, and the reconcile copies what it changes.
    return dict(body)


def _store_values(index: Any, key: Any) -> list[dict[str, Any]]:
    try:
        return list(index[key])
    except KeyError:
        return []


@dataclass
class Controller:
    """Process-wide state of the operator: caches, the queue, workers and metrics."""

    kubeconfig: str | None = None
    workers: int = 8
    restart_backoff_seconds: float = 10.0
    topology_label: str = "nvidia.com/gpu.clique"
    stats_max_bytes: int = DEFAULT_STATS_MAX_BYTES
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL_SECONDS
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    exporter: JobMetricsExporter = field(default_factory=JobMetricsExporter)
    monitor: Monitor | None = None
    queue: WorkQueue[JobKey] = field(default_factory=WorkQueue)
    indexes: dict[str, Any] = field(default_factory=dict)
    node_signatures: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    # Whether each job's last pass left it holding GPUs (planned, not finished).
    holding: dict[JobKey, bool] = field(default_factory=dict)
    # Uids of live pods asking for devices: when one ends or goes, waiting jobs may fit.
    device_pods: set[str] = field(default_factory=set)
    # Per job: consecutive failed passes and when the last one failed (monotonic seconds).
    failures: dict[JobKey, tuple[int, float]] = field(default_factory=dict)
    kube: Kube | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def view(self) -> ClusterView:
        def one(name: str, key: Any) -> dict[str, Any] | None:
            values = _store_values(self.indexes.get(name, {}), key)
            return values[0] if values else None

        return ClusterView(
            job=lambda key: one("shardwise_jobs", key),
            jobs=self._all_jobs,
            nodes=lambda: [v for vs in self.indexes.get("shardwise_nodes", {}).values() for v in vs],
            live_pods=lambda: _store_values(self.indexes.get("shardwise_live_pods", {}), None),
            priority_classes=self._priority_classes,
            job_pods=lambda key: _store_values(self.indexes.get("shardwise_job_pods", {}), key),
            job_children=lambda key: [
                *_store_values(self.indexes.get("shardwise_job_configmaps", {}), key),
                *_store_values(self.indexes.get("shardwise_job_services", {}), key),
            ],
        )

    async def start(self) -> None:
        self.kube = await Kube.connect(self.kubeconfig)
        self.monitor = Monitor(
            self.kube,
            self.view(),
            self.exporter,
            poke=self.queue.add,
            jobs=self._all_jobs,
            stats_max_bytes=self.stats_max_bytes,
            progress_interval=self.progress_interval,
            rejected=self.metrics.scrape_rejections,
        )
        reconciler = Reconciler(
            self.kube,
            self.view(),
            on_pass=self._observed,
            restart_backoff_seconds=self.restart_backoff_seconds,
            topology_label=self.topology_label,
            findings=self.monitor.conditions,
            checkpoints=self.monitor.checkpoint,
            progress=self.monitor.progress,
        )
        self.tasks = [asyncio.create_task(self._work(reconciler)) for _ in range(self.workers)]
        self.tasks.append(asyncio.create_task(self.monitor.run()))

    def _all_jobs(self) -> list[dict[str, Any]]:
        return [job for values in self.indexes.get("shardwise_jobs", {}).values() for job in values]

    def alive(self, key: JobKey, uid: str) -> bool:
        """The watch still holds this job with this uid (kopf drops a deleted object from its
        indexes before our DELETED handler runs, so a gone job is never seen alive again)."""
        job = _store_values(self.indexes.get("shardwise_jobs", {}), key)
        return bool(job) and (job[0].get("metadata") or {}).get("uid") == uid

    def _priority_classes(self) -> tuple[dict[str, int], int]:
        classes: dict[str, int] = {}
        default = 0
        for values in self.indexes.get("shardwise_priority_classes", {}).values():
            for name, value, is_default in values:
                classes[name] = value
                default = value if is_default else default
        return classes, default

    def _observed(self, key: JobKey, uid: str, status: dict[str, Any]) -> None:
        # A pass that ends after the job's DELETED event (the pass that deleted it, say) must not
        # bring its series back: only observations of the job the watch still holds count.
        if not self.alive(key, uid):
            return
        holds = bool(status.get("layout")) and not finished(status)
        if self.holding.get(key, False) != holds:
            # A job took or gave back its GPUs: the jobs queued behind it get their turn now,
            # not at their next routine requeue.
            self.holding[key] = holds
            self.poke_waiting_jobs()
        self.metrics.observe_job(key, status)
        self.exporter.observe_status(key[0], key[1], status)

    def forget(self, key: JobKey) -> None:
        """The job is gone: no work, no series, no counters left behind."""
        self.queue.forget(key)
        if self.holding.pop(key, False):
            self.poke_waiting_jobs()
        self.failures.pop(key, None)
        self.metrics.forget_job(key)
        self.exporter.forget_job(*key)
        if self.monitor is not None:
            self.monitor.forget(key)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.kube is not None:
            await self.kube.close()

    async def _work(self, reconciler: Reconciler) -> None:
        while True:
            key = await self.queue.get()
            started = time.perf_counter()
            try:
                requeue = await reconciler.reconcile(key)
                self._succeeded(key)
                if requeue is not None:
                    self.queue.add_after(key, requeue)
            except asyncio.CancelledError:
                raise
            except KubeError as exc:
                if exc.status == 403 and "NamespaceTerminating" in exc.body:
                    # The job's namespace is being deleted, the job with it: nothing to retry.
                    log.info("ParallelTrainingJob %s/%s: namespace terminating; leaving the job alone", *key)
                    self.failures.pop(key, None)
                    continue
                self._failed(key)
            except Exception:
                self._failed(key)
            finally:
                self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
                self.queue.done(key)

    def _failed(self, key: JobKey) -> None:
        """Log the pass's exception and retry the job with jittered exponential backoff."""
        count = self.failures.get(key, (0, 0.0))[0] + 1
        self.failures[key] = (count, time.monotonic())
        delay = failure_backoff(count, random.random())
        self.metrics.reconcile_errors.inc()
        log.exception("ParallelTrainingJob %s/%s: reconcile failed; retry in %.1fs", *key, delay)
        self.queue.add_after(key, delay)

    def _succeeded(self, key: JobKey) -> None:
        """Forget the job's failures only once it has passed cleanly for a whole backoff period:
        a job whose passes alternate (an event-driven pass succeeds between failing ones) keeps
        backing off instead of starting from the shortest delay every time."""
        entry = self.failures.get(key)
        if entry is not None and time.monotonic() - entry[1] >= failure_backoff(entry[0], 1.0):
            del self.failures[key]

    def poke_waiting_jobs(self, *, unplanned_only: bool = False) -> None:
        """Inventory changed: every job that is not finished (or only those not planned yet)
        gets a pass: unplanned ones may fit now."""
        for values in self.indexes.get("shardwise_jobs", {}).values():
            for job in values:
                status = job.get("status") or {}
                if not finished(status) and not (unplanned_only and status.get("layout")):
                    meta = job["metadata"]
                    self.queue.add((meta["namespace"], meta["name"]))


def failure_backoff(count: int, draw: float) -> float:
    """Seconds before retrying a job whose count-th consecutive pass failed: 1 s doubling to 5 min,
    spread by draw (uniform in [0, 1)) over [d/2, 3d/2)."""
    return lifecycle.jittered(lifecycle.backoff_seconds(count, 1.0), draw)


CONTROLLER = Controller()


INDEXES = (
    "shardwise_jobs",
    "shardwise_nodes",
    "shardwise_live_pods",
    "shardwise_priority_classes",
    "shardwise_job_pods",
    "shardwise_job_configmaps",
    "shardwise_job_services",
)


def _remember_indexes(kwargs: dict[str, Any]) -> None:
    for name in INDEXES:
        if name in kwargs:
            CONTROLLER.indexes[name] = kwargs[name]


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Nothing of kopf's own bookkeeping lands in status; annotations under our prefix instead.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.shardwise.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.shardwise.dev")
    # A stalled watch is abandoned and re-listed instead of hanging forever.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.posting.level = logging.WARNING
    await CONTROLLER.start()


@kopf.on.cleanup()
async def _cleanup(**_: Any) -> None:
    await CONTROLLER.stop()


@kopf.index(GROUP, VERSION, PLURAL)
async def shardwise_jobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): _plain(body)}


@kopf.index("", "v1", "nodes")
async def shardwise_nodes(name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {name: _plain(body)}


def _is_live(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in ("Succeeded", "Failed")


@kopf.index("", "v1", "pods", when=_is_live)
async def shardwise_live_pods(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    # Only what the inventory needs: who holds (or, not bound yet, will hold) which GPUs where.
    return {
        None: {
            "metadata": {
                "name": body["metadata"].get("name"),
                "namespace": body["metadata"].get("namespace"),
                "labels": dict(body["metadata"].get("labels") or {}),
            },
            "spec": {
                "nodeName": body["spec"].get("nodeName"),
                "nodeSelector": dict(body["spec"].get("nodeSelector") or {}),
                "containers": [
                    {"resources": copy.deepcopy(c.get("resources") or {})}
                    for c in body["spec"].get("containers") or []
                ],
                "initContainers": [
                    {"resources": copy.deepcopy(c.get("resources") or {})}
                    for c in body["spec"].get("initContainers") or []
                ],
            },
            "status": {"phase": body.get("status", {}).get("phase")},
        }
    }


@kopf.index("scheduling.k8s.io", "v1", "priorityclasses")
async def shardwise_priority_classes(name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {name: (name, int(body.get("value") or 0), bool(body.get("globalDefault")))}


@kopf.index("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
async def shardwise_job_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_JOB]): _plain(body)}


def _child(kind: str, body: kopf.Body) -> dict[str, Any]:
    """Only what the pass checks: that the job's child exists and the job controls it."""
    return {"kind": kind, "name": body["metadata"].get("name"), "owner": controller_uid(dict(body))}


@kopf.index("", "v1", "configmaps", labels={LABEL_JOB: kopf.PRESENT})
async def shardwise_job_configmaps(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_JOB]): _child("ConfigMap", body)}


@kopf.index("", "v1", "services", labels={LABEL_JOB: kopf.PRESENT})
async def shardwise_job_services(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_JOB]): _child("Service", body)}


@kopf.on.event("", "v1", "configmaps", labels={LABEL_JOB: kopf.PRESENT})
@kopf.on.event("", "v1", "services", labels={LABEL_JOB: kopf.PRESENT})
async def _job_child_event(
    event: kopf.RawEvent, namespace: str | None, labels: kopf.Labels, **kwargs: Any
) -> None:
    _remember_indexes(kwargs)
    if event.get("type") == "DELETED":
        # Only the absence matters: the job's pass restores a deleted child.
        CONTROLLER.queue.add((namespace or "", labels[LABEL_JOB]))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def _job_event(event: kopf.RawEvent, namespace: str | None, name: str, **kwargs: Any) -> None:
    _remember_indexes(kwargs)
    key = (namespace or "", name)
    if event.get("type") == "DELETED":
        CONTROLLER.forget(key)
        return
    CONTROLLER.queue.add(key)


@kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
async def _job_pod_event(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    _remember_indexes(kwargs)
    CONTROLLER.queue.add((namespace or "", labels[LABEL_JOB]))


@kopf.on.event("", "v1", "pods")
async def _pod_event(event: kopf.RawEvent, body: kopf.Body, **kwargs: Any) -> None:
    # Devices come back when any pod that held them ends or goes, whoever owned it: another
    # operator's job, a job in a namespace being deleted, a plain Deployment. Waiting jobs get
    # their turn then, not at their next routine requeue.
    _remember_indexes(kwargs)
    uid = str(body["metadata"].get("uid") or "")
    live = event.get("type") != "DELETED" and _is_live(body.status)
    if live and inventory.holds_devices(body):
        CONTROLLER.device_pods.add(uid)
    elif uid in CONTROLLER.device_pods:
        CONTROLLER.device_pods.discard(uid)
        CONTROLLER.poke_waiting_jobs(unplanned_only=True)


@kopf.on.event("", "v1", "nodes")
async def _node_event(event: kopf.RawEvent, name: str, body: kopf.Body, **kwargs: Any) -> None:
    _remember_indexes(kwargs)
    status = body.get("status") or {}
    ready = [c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    signature = (
        event.get("type") == "DELETED",
        tuple(sorted((status.get("allocatable") or {}).items())),
        tuple(sorted((body["metadata"].get("labels") or {}).items())),
        tuple(ready),
        bool((body.get("spec") or {}).get("unschedulable")),
        len((body.get("spec") or {}).get("taints") or []),
    )
    if CONTROLLER.node_signatures.get(name) != signature:
        CONTROLLER.node_signatures[name] = signature
        CONTROLLER.poke_waiting_jobs()
    if event.get("type") == "DELETED":
        CONTROLLER.node_signatures.pop(name, None)
