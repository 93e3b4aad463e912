"""The scrape loop: every running job's pods are scraped at its monitoring interval and analysed.

Findings become the StragglerDetected / MemoryImbalanced conditions: the monitor keeps them per
job and pokes the job's reconcile, which writes them in its single status patch. Pages are read
up to a byte cap and parsed in a worker process: a pod's page can neither fill the operator's
memory nor stall its event loop (watches, reconciles, the liveness probe), not even by holding
the GIL for the seconds a large page takes to parse.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
from prometheus_client import Counter

from shardwise.handlers.reconcile import ClusterView, JobKey
from shardwise.kube.children import controller_uid
from shardwise.kube.client import Kube, KubeError
from shardwise.metrics.analysis import (
    AnalysisSettings,
    ConditionValue,
    JobWindows,
    ParsedPage,
    PlanView,
    TrainerMetricsError,
    observe_pass,
    page_limit,
    parse_page,
    plan_from_layout,
)
from shardwise.metrics.exporter import JobMetricsExporter
from shardwise.metrics.progress import (
    DEFAULT_PROGRESS_INTERVAL_SECONDS,
    Tracker,
    advance,
    due,
    observe,
    progress_status,
)
from shardwise.metrics.scrape import DEFAULT_STATS_MAX_BYTES, PageTooLargeError, fetch_pages
from shardwise.metrics.trainer_page import latest_checkpoint
from shardwise.resources.names import LABEL_ATTEMPT, LAYOUT_FILE_KEY, TRAINER_METRICS_PORT, configmap_name

log = logging.getLogger(__name__)


@dataclass
class _Watched:
    """What the monitor keeps per running job (one attempt)."""

    uid: str
    attempt: int
    plan: PlanView | None
    state: JobWindows = field(default_factory=JobWindows)
    next_due: float = 0.0
    busy: bool = False
    conditions: tuple[ConditionValue, ...] = ()
    checkpoint: tuple[int, float] | None = None  # (step, unix time) the trainer last reported
    tracker: Tracker = field(default_factory=Tracker)
    progress: dict[str, Any] | None = None  # what status.progress is to say (changes once per interval)
    progress_at: float | None = None  # monotonic time it last changed


@dataclass
class Monitor:
    """Schedules scrape passes; owns the per-job windows and the job metrics exporter."""

    kube: Kube
    view: ClusterView
    exporter: JobMetricsExporter
    poke: Callable[[JobKey], None]
    jobs: Callable[[], list[dict[str, Any]]]
    concurrency: int = 16
    tick_seconds: float = 1.0
    stats_max_bytes: int = DEFAULT_STATS_MAX_BYTES
    # Least seconds between two status.progress writes of one job: 50 running jobs must not
    # flood the API server with a write per scrape each.
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL_SECONDS
    # shardwise_operator_scrape_rejections_total{reason}: pages and series refused.
    rejected: Counter | None = None
    watched: dict[JobKey, _Watched] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    parser: Executor | None = None  # one worker process, started with the loop

    @staticmethod
    def _parser() -> Executor:
        # spawn, not fork: the operator process has threads (the metrics server, the executor's).
        return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))

    def conditions(self, key: JobKey) -> tuple[ConditionValue, ...]:
        """The latest findings for a job (empty before its first full window)."""
        entry = self.watched.get(key)
        return entry.conditions if entry else ()

    def checkpoint(self, key: JobKey) -> tuple[int, float] | None:
        """The newest complete checkpoint the job's current attempt reported (status.latestCheckpoint)."""
        entry = self.watched.get(key)
        return entry.checkpoint if entry else None

    def progress(self, key: JobKey) -> dict[str, Any] | None:
        """What status.progress is to say now (None before the first step of the attempt)."""
        entry = self.watched.get(key)
        return entry.progress if entry else None

    def _progress(self, job: dict[str, Any], entry: _Watched, samples: list[Any], world: int | None) -> bool:
        """Fold one pass into the job's progress; True when status.progress is due to change."""
        entry.tracker = advance(entry.tracker, observe(samples))
        fresh = progress_status(entry.tracker, entry.plan, world)
        meta, status = job["metadata"], job.get("status") or {}
        self.exporter.update_progress(meta["namespace"], meta["name"], fresh, _deadline(job))
        if fresh is None or fresh == entry.progress or entry.tracker.last is None:
            return False
        now = time.monotonic()
        since = None if entry.progress_at is None else now - entry.progress_at
        if not due(entry.tracker.last.step, entry.tracker.last.total_steps, since_last_write=since,
                   interval=self.progress_interval):  # fmt: skip
            return False
        entry.progress, entry.progress_at = fresh, now
        return status.get("progress") != fresh

    async def run(self) -> None:
        limit = asyncio.Semaphore(self.concurrency)
        self.parser = self._parser()
        try:
            async with aiohttp.ClientSession() as session:
                while True:
                    await asyncio.sleep(self.tick_seconds)
                    try:
                        await self._tick(session, limit)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("scrape loop pass failed")
        finally:
            self.parser.shutdown(wait=False, cancel_futures=True)

    async def _parse(
        self, pages: dict[str, str | BaseException | None], world_size: int | None
    ) -> dict[str, str | ParsedPage | BaseException | None]:
        """Each page's text parsed in the worker process (ranks checked against world_size)."""
        out: dict[str, str | ParsedPage | BaseException | None] = dict(pages)
        loop = asyncio.get_running_loop()
        for pod, page in pages.items():
            if not isinstance(page, str):
                continue
            if self.parser is None:
                self.parser = self._parser()
            try:
                out[pod] = await loop.run_in_executor(self.parser, parse_page, page, world_size)
            except TrainerMetricsError as exc:
                out[pod] = exc
            except BrokenProcessPool as exc:  # the worker died (OOM-killed, say): a new one next time
                log.warning("stats parser process died: %s", exc)
                self.parser = None
                out[pod] = exc
        return out

    def forget(self, key: JobKey) -> None:
        """The job is gone: its windows go; a scrape still in flight finds it gone and drops its result."""
        self.watched.pop(key, None)

    def _alive(self, key: JobKey, uid: str) -> bool:
        job = self.view.job(key)
        return job is not None and (job.get("metadata") or {}).get("uid") == uid

    def _reject(self, reason: str, count: int = 1) -> None:
        if self.rejected is not None:
            self.rejected.labels(reason).inc(count)

    async def _tick(self, session: aiohttp.ClientSession, limit: asyncio.Semaphore) -> None:
        now = time.monotonic()
        running: set[JobKey] = set()
        for job in self.jobs():
            meta, status = job["metadata"], job.get("status") or {}
            if status.get("phase") != "Running":
                continue
            key = (meta["namespace"], meta["name"])
            running.add(key)
            attempt = int(status.get("attempt") or 0)
            entry = self.watched.get(key)
            if entry is None or entry.uid != meta.get("uid") or entry.attempt != attempt:
                # A new job or a new attempt: fresh windows (a restarted gang is a new population).
                entry = self.watched[key] = _Watched(meta.get("uid", ""), attempt, await self._plan(key))
            if entry.busy or now < entry.next_due:
                continue
            interval = float((job.get("spec") or {}).get("monitoring", {}).get("scrapeIntervalSeconds") or 15)
            entry.next_due = now + interval
            entry.busy = True
            task = asyncio.create_task(self._scrape(session, limit, key, job, entry))
            self.tasks.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self.tasks.discard)
        for key in [k for k in self.watched if k not in running]:
            self.watched.pop(key)
            self.exporter.clear_analysis(*key)

    async def _plan(self, key: JobKey) -> PlanView | None:
        try:
            cm = await self.kube.get("v1", "ConfigMap", key[0], configmap_name(key[1]))
            return plan_from_layout(json.loads(cm["data"][LAYOUT_FILE_KEY]))
        except (KubeError, KeyError, ValueError) as exc:
            log.warning("ParallelTrainingJob %s/%s: no layout for the analysis: %s", *key, exc)
            return None

    async def _scrape(
        self,
        session: aiohttp.ClientSession,
        limit: asyncio.Semaphore,
        key: JobKey,
        job: dict[str, Any],
        entry: _Watched,
    ) -> None:
        try:
            urls = {}
            for pod in self.view.job_pods(key):
                if controller_uid(pod) != entry.uid:
                    continue  # the job's labels, but not its pod
                labels = pod["metadata"].get("labels") or {}
                ip = (pod.get("status") or {}).get("podIP")
                if labels.get(LABEL_ATTEMPT) == str(entry.attempt) and ip:
                    urls[pod["metadata"]["name"]] = f"http://{ip}:{TRAINER_METRICS_PORT}/metrics"
            if not urls:
                return
            pages = await fetch_pages(session, urls, limit=limit, max_bytes=self.stats_max_bytes)
            settings = AnalysisSettings.from_monitoring((job.get("spec") or {}).get("monitoring"))
            gpus = ((job.get("status") or {}).get("layout") or {}).get("gpus")
            world = int(gpus) if gpus else None
            # Parsing costs 0.1-0.7 s per MB of pure Python: never on the event loop. What is left
            # (windows bounded by the world size) is cheap.
            parsed = await self._parse(pages, page_limit(entry.plan, world))
            outcome = observe_pass(entry.state, parsed, entry.plan, settings, world)
            if not self._alive(key, entry.uid) or self.watched.get(key) is not entry:
                return  # the job (or this attempt) went while the scrape was in flight
            entry.state = outcome.state
            self.exporter.update_job(key[0], key[1], outcome.analysis)
            for failed in outcome.failed_pods:
                self.exporter.record_scrape_error(key[0], key[1], failed)
            for page in pages.values():
                if isinstance(page, PageTooLargeError):
                    self._reject("too_large")
            for _, reason, count in outcome.rejected:
                self._reject(reason, count)
            for error in outcome.errors:
                log.info("ParallelTrainingJob %s/%s: scrape: %s", key[0], key[1], error)
            samples = [
                sample for page in parsed.values() if isinstance(page, ParsedPage) for sample in page.samples
            ]
            found = latest_checkpoint(samples)
            moved = self._progress(job, entry, samples, world)
            if (
                moved
                or outcome.conditions != entry.conditions
                or (found is not None and found != entry.checkpoint)
            ):
                entry.conditions = outcome.conditions
                entry.checkpoint = found or entry.checkpoint
                self.poke(key)
        finally:
            entry.busy = False


def _deadline(job: dict[str, Any]) -> float | None:
    """Unix time spec.runPolicy.activeDeadlineSeconds runs out for the current attempt."""
    limit = ((job.get("spec") or {}).get("runPolicy") or {}).get("activeDeadlineSeconds")
    started = (job.get("status") or {}).get("startTime")
    if not limit or not started:
        return None
    try:
        return datetime.fromisoformat(str(started).replace("Z", "+00:00")).timestamp() + float(limit)
    except ValueError:
        return None
