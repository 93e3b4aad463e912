"""The operator's own Prometheus metrics: reconcile health, jobs by phase, the plan, refused stats."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

PHASES = ("Pending", "Starting", "Running", "Succeeded", "Failed", "Suspended")


class _JobsCollector(Collector):
    """Computed at scrape time from the last status of every job, so deleted jobs leave no series."""

    def __init__(self, jobs: dict[tuple[str, str], dict[str, Any]]) -> None:
        self._jobs = jobs

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        by_phase = Counter(str(s.get("phase") or "Pending") for s in self._jobs.values())
        phases = GaugeMetricFamily("shardwise_jobs", "ParallelTrainingJobs by phase.", labels=["phase"])
        for phase in sorted(set(PHASES) | set(by_phase)):
            phases.add_metric([phase], by_phase.get(phase, 0))
        yield phases
        plan = InfoMetricFamily(
            "shardwise_job_layout",
            "The planned layout of each job (tensor, pipeline, data parallel degrees and ZeRO stage).",
            labels=["namespace", "job"],
        )
        for (namespace, name), status in sorted(self._jobs.items()):
            layout = status.get("layout")
            if layout:
                plan.add_metric(
                    [namespace, name],
                    {
                        "tp": str(layout.get("tensor", "")),
                        "pp": str(layout.get("pipeline", "")),
                        "dp": str(layout.get("data", "")),
                        "zero_stage": str(layout.get("zeroStage", "")),
                        "summary": str(layout.get("summary", "")),
                    },
                )
        yield plan


class OperatorMetrics:
    """Metrics of one operator process, in their own registry (so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.reconcile_seconds = Histogram(
            "shardwise_operator_reconcile_duration_seconds",
            "Time of one reconcile pass of a ParallelTrainingJob.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.reconcile_errors = PromCounter(
            "shardwise_operator_reconcile_errors",
            "Reconcile passes that raised an error (retried with backoff).",
            registry=self.registry,
        )
        self.scrape_rejections = PromCounter(
            "shardwise_operator_scrape_rejections",
            "Trainer stats refused by the scrape loop: pages past --stats-max-bytes (reason too_large)"
            " and series with a rank outside [0, world size) or a label the trainer never sets.",
            labelnames=["reason"],
            registry=self.registry,
        )
        self.registry.register(_JobsCollector(self.jobs))

    def observe_job(self, key: tuple[str, str], status: dict[str, Any]) -> None:
        self.jobs[key] = status

    def forget_job(self, key: tuple[str, str]) -> None:
        self.jobs.pop(key, None)
