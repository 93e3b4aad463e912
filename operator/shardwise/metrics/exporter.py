"""The per-job analysis rendered as Prometheus metrics (names, units and labels: docs/metrics.md).

A custom collector, computed at scrape time from the last :class:`~shardwise.metrics.analysis.JobAnalysis`
of each job, so a forgotten job leaves no series behind (nothing is kept in prometheus_client's
own label children, which would have to be removed one by one). Label sets are bounded: one
series per GPU / rank of a live job, per pipeline stage, per job, per pod.

The scrape loop (operator side) calls :meth:`update_job` after each analysis pass and
:meth:`record_scrape_error` when a pod does not answer or answers garbage; the reconciler calls
:meth:`observe_status` with the job's status (phase, restarts) and :meth:`forget_job` when the
job is deleted. These may run on another thread than the HTTP server's: a lock guards the maps
and both renderings work on a snapshot (the analysis values themselves are immutable).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import utils as _prom_utils
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from shardwise.metrics.analysis import GpuMemory, JobAnalysis, RankIdentity, RankTiming
from shardwise.metrics.progress_metrics import PROGRESS_FAMILIES, PROGRESS_NAMES, progress_series

JobKey = tuple[str, str]  # (namespace, name)

JOB_LABELS = ("namespace", "job")
RANK_LABELS = ("namespace", "job", "rank", "pod", "node", "gpu", "stage")
STAGE_LABELS = ("namespace", "job", "stage")
POD_LABELS = ("namespace", "job", "pod")
PHASE_LABELS = ("namespace", "job", "phase")

_GpuValue = Callable[[GpuMemory], float | None]
_RankValue = Callable[[RankTiming], float | None]

#: (name, help, value) of every per-GPU gauge; labels RANK_LABELS.
GPU_GAUGES: tuple[tuple[str, str, _GpuValue], ...] = (
    (
        "shardwise_gpu_memory_used_bytes",
        "Peak memory of the GPU over the analysis window, as the trainer measures it.",
        lambda g: g.used_bytes,
    ),
    (
        "shardwise_gpu_memory_predicted_bytes",
        "The plan's predicted memory per GPU of this GPU's pipeline stage (layout.json predicted.per_stage).",
        lambda g: g.predicted_bytes,
    ),
    (
        "shardwise_gpu_memory_capacity_bytes",
        "Memory capacity of the GPU (measured device total, else the plan's GPU memory).",
        lambda g: g.capacity_bytes,
    ),
    (
        "shardwise_gpu_memory_prediction_error_ratio",
        "(used - predicted) / predicted peak GPU memory: positive when the GPU holds more than planned.",
        lambda g: g.prediction_error_ratio,
    ),
    (
        "shardwise_gpu_model_state_bytes",
        "Peak parameter + gradient + optimizer-state bytes the rank holds on this GPU.",
        lambda g: g.model_state_bytes,
    ),
    (
        "shardwise_gpu_model_state_predicted_bytes",
        "The plan's model-state bytes per GPU of this GPU's pipeline stage.",
        lambda g: g.predicted_model_state_bytes,
    ),
)

#: (name, help, value) of every per-rank gauge; labels RANK_LABELS.
RANK_GAUGES: tuple[tuple[str, str, _RankValue], ...] = (
    (
        "shardwise_rank_step_seconds",
        "Median step time of the rank over the analysis window (end-of-step wait excluded).",
        lambda r: r.step_seconds,
    ),
    (
        "shardwise_rank_compute_seconds",
        "Median time per step the rank spends computing, outside collectives, over the analysis window.",
        lambda r: r.compute_seconds,
    ),
    (
        "shardwise_rank_communication_seconds",
        "Median time per step the rank spends inside collectives (waiting for its peers included).",
        lambda r: r.communication_seconds,
    ),
    (
        "shardwise_rank_compute_share_ratio",
        "Median share of the rank's step time spent computing (the rest is communication).",
        lambda r: r.compute_share,
    ),
    (
        "shardwise_rank_tokens_per_second",
        "Median tokens per second of the rank's data-parallel replica over the analysis window.",
        lambda r: r.tokens_per_second,
    ),
    (
        "shardwise_rank_straggler_score",
        "Rank's median compute time / the median of the other ranks of its pipeline stage (a stage of "
        "one rank: its compute share of the step / the other stages'; 1 = typical).",
        lambda r: r.score,
    ),
    (
        "shardwise_rank_straggler",
        "1 while the rank is flagged as a straggler (after hysteresis), else 0.",
        lambda r: 1.0 if r.straggler else (0.0 if r.score is not None else None),
    ),
)


#: (name, type, help, labels) of every job-level family, in output order.
JOB_FAMILIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "shardwise_job_memory_imbalance_ratio",
        "gauge",
        "Max / mean peak GPU memory across all GPUs of the job (1 = perfectly even).",
        JOB_LABELS,
    ),
    (
        "shardwise_job_memory_variation_ratio",
        "gauge",
        "Coefficient of variation (population std dev / mean) of peak GPU memory across the job.",
        JOB_LABELS,
    ),
    (
        "shardwise_stage_memory_imbalance_ratio",
        "gauge",
        "Max / mean peak GPU memory across the GPUs of one pipeline stage.",
        STAGE_LABELS,
    ),
    (
        "shardwise_stage_memory_spread_ratio",
        "gauge",
        "(max - min) / max peak GPU memory within one pipeline stage "
        "(compared with spec.monitoring.memoryImbalanceThreshold).",
        STAGE_LABELS,
    ),
    ("shardwise_job_stragglers", "gauge", "Ranks of the job currently flagged as stragglers.", JOB_LABELS),
    (
        "shardwise_job_straggler_threshold_ratio",
        "gauge",
        "The job's spec.monitoring.stragglerThreshold (a rank is slow above a score of 1 + this).",
        JOB_LABELS,
    ),
    (
        "shardwise_job_tokens_per_second",
        "gauge",
        "Training throughput of the job: sum over data-parallel replicas of their slowest rank.",
        JOB_LABELS,
    ),
    (
        "shardwise_job_ranks_reporting",
        "gauge",
        "Ranks of the job whose stats the operator has received.",
        JOB_LABELS,
    ),
    ("shardwise_job_restarts", "gauge", "Gang restarts of the job so far (status.restarts).", JOB_LABELS),
    (
        "shardwise_job_phase",
        "gauge",
        "1 for the job's current status.phase (one series per job).",
        PHASE_LABELS,
    ),
    (
        "shardwise_scrape_errors",
        "counter",
        "Failed reads of a trainer pod's stats endpoint (no answer, HTTP error, unparsable text).",
        POD_LABELS,
    ),
)

#: Every family: (name, type, help, labels), in output order.
FAMILIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    *((name, "gauge", help_text, RANK_LABELS) for name, help_text, _ in GPU_GAUGES),
    *((name, "gauge", help_text, RANK_LABELS) for name, help_text, _ in RANK_GAUGES),
    *JOB_FAMILIES,
    *PROGRESS_FAMILIES,
)
#: The names a scrape shows (a counter ``x`` is exposed as ``x_total``).
EXPOSED_NAMES: tuple[str, ...] = tuple(n + "_total" if t == "counter" else n for n, t, _, _ in FAMILIES)
#: Families fed by the job's status and scrape errors (rendered at scrape time); the others
#: change only with an analysis pass (rendered then, cached as text per job).
_STATUS_FAMILIES = (
    "shardwise_job_restarts",
    "shardwise_job_phase",
    "shardwise_scrape_errors",
    *PROGRESS_NAMES,
)
_ANALYSIS_FAMILIES = tuple(n for n, _, _, _ in FAMILIES if n not in _STATUS_FAMILIES)

_Series = list[tuple[list[str], float]]

#: prometheus_client's own float formatting (untyped upstream), so both renderings agree.
_float_to_go = cast(Callable[[float], str], _prom_utils.floatToGoString)


def _rank_labels(key: JobKey, ident: RankIdentity) -> list[str]:
    return [key[0], key[1], str(ident.rank), ident.pod, ident.node, ident.gpu, str(ident.stage)]


def _analysis_series(key: JobKey, analysis: JobAnalysis) -> dict[str, _Series]:
    """Every series one analysis produces, by family name: the single source of both renderings."""
    out: dict[str, _Series] = {name: [] for name in _ANALYSIS_FAMILIES}
    mem, strag = analysis.memory, analysis.stragglers
    for g in mem.gpus:
        labels = _rank_labels(key, g.identity)
        for name, _, gpu_value in GPU_GAUGES:
            value = gpu_value(g)
            if value is not None:
                out[name].append((labels, value))
    for r in strag.ranks:
        labels = _rank_labels(key, r.identity)
        for name, _, rank_value in RANK_GAUGES:
            value = rank_value(r)
            if value is not None:
                out[name].append((labels, value))
    job = list(key)
    if mem.job is not None:
        out["shardwise_job_memory_imbalance_ratio"].append((job, mem.job.ratio))
        out["shardwise_job_memory_variation_ratio"].append((job, mem.job.cv))
    for s in mem.stages:
        out["shardwise_stage_memory_imbalance_ratio"].append(([*job, str(s.stage)], s.ratio))
        out["shardwise_stage_memory_spread_ratio"].append(([*job, str(s.stage)], s.spread))
    out["shardwise_job_stragglers"].append((job, float(len(strag.findings))))
    out["shardwise_job_straggler_threshold_ratio"].append((job, strag.threshold))
    if analysis.tokens_per_second is not None:
        out["shardwise_job_tokens_per_second"].append((job, analysis.tokens_per_second))
    out["shardwise_job_ranks_reporting"].append((job, float(len(strag.ranks))))
    return out


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class _TextFamily:
    """Renders one family's samples exactly as ``prometheus_client.generate_latest`` does."""

    def __init__(self, name: str, mtype: str, help_text: str, labels: tuple[str, ...]) -> None:
        self.sample_name = name + "_total" if mtype == "counter" else name
        escaped_help = help_text.replace("\\", r"\\").replace("\n", r"\n")
        self.header = f"# HELP {self.sample_name} {escaped_help}\n# TYPE {self.sample_name} {mtype}\n"
        self.order = sorted(range(len(labels)), key=lambda i: labels[i])  # generate_latest sorts labels
        self.names = [labels[i] for i in self.order]

    def lines(self, series: _Series, memo: dict[tuple[str, ...], str] | None = None) -> str:
        """Sample lines; ``memo`` shares label strings between families of the same label names."""
        memo = {} if memo is None else memo
        out = []
        for values, value in series:
            key = (*self.names, *values)
            labelstr = memo.get(key)
            if labelstr is None:
                labelstr = memo[key] = ",".join(
                    f'{name}="{_escape(values[i])}"' for name, i in zip(self.names, self.order, strict=True)
                )
            out.append(f"{self.sample_name}{{{labelstr}}} {_float_to_go(value)}\n")
        return "".join(out)


_TEXT = {name: _TextFamily(name, mtype, help_text, labels) for name, mtype, help_text, labels in FAMILIES}


@dataclass
class _JobEntry:
    analysis: JobAnalysis | None = None
    text: dict[str, str] = field(default_factory=dict)  # family -> this job's rendered lines
    restarts: int | None = None
    phase: str | None = None
    scrape_errors: dict[str, float] = field(default_factory=dict)
    progress: dict[str, _Series] = field(default_factory=dict)  # family -> this job's progress series


class JobMetricsExporter(Collector):
    """Per-GPU memory, per-rank step time and straggler metrics of every watched job.

    Two renderings of the same series: :meth:`collect` (a prometheus_client ``Collector``, for a
    registry) and :meth:`render` (the exposition text, cached per job at :meth:`update_job`, so a
    scrape of thousands of GPUs costs a string join; a test holds it byte-identical to
    ``generate_latest`` over :meth:`collect`). Serve either, not both: :func:`exposition`.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[JobKey, _JobEntry] = {}
        if registry is not None:
            registry.register(self)

    # -- called by the scrape loop ---------------------------------------------------------

    def update_job(self, namespace: str, job: str, analysis: JobAnalysis) -> None:
        """Replace the job's analysis (the series of ranks no longer present disappear)."""
        series = _analysis_series((namespace, job), analysis)
        memo: dict[tuple[str, ...], str] = {}
        text = {name: _TEXT[name].lines(rows, memo) for name, rows in series.items() if rows}
        with self._lock:
            entry = self._jobs.setdefault((namespace, job), _JobEntry())
            entry.analysis, entry.text = analysis, text

    def observe_status(self, namespace: str, job: str, status: Mapping[str, Any]) -> None:
        """The job's ``status.phase`` and ``status.restarts`` (call wherever the status is read)."""
        restarts, phase = status.get("restarts"), status.get("phase")
        with self._lock:
            entry = self._jobs.setdefault((namespace, job), _JobEntry())
            entry.restarts = int(restarts) if restarts is not None else None
            entry.phase = str(phase) if phase else None

    def update_progress(
        self, namespace: str, job: str, progress: Mapping[str, Any] | None, deadline: float | None = None
    ) -> None:
        """The job's latest progress (status.progress figures) and its deadline (Unix time)."""
        series = progress_series((namespace, job), progress, deadline) if progress else {}
        with self._lock:
            self._jobs.setdefault((namespace, job), _JobEntry()).progress = series

    def record_scrape_error(self, namespace: str, job: str, pod: str, count: int = 1) -> None:
        """A pod's stats endpoint did not answer, answered an error or unparsable text."""
        with self._lock:
            errors = self._jobs.setdefault((namespace, job), _JobEntry()).scrape_errors
            errors[pod] = errors.get(pod, 0.0) + count

    def clear_analysis(self, namespace: str, job: str) -> None:
        """The job stopped running (finished, suspended, restarting): its per-GPU, per-rank and
        per-stage series go; phase, restarts and scrape errors stay until :meth:`forget_job`."""
        with self._lock:
            entry = self._jobs.get((namespace, job))
            if entry is not None:
                entry.analysis, entry.text, entry.progress = None, {}, {}

    def forget_job(self, namespace: str, job: str) -> None:
        """Drop every series of the job (deleted or finished): nothing of it is rendered again."""
        with self._lock:
            self._jobs.pop((namespace, job), None)

    def jobs(self) -> list[JobKey]:
        with self._lock:
            return sorted(self._jobs)

    # -- renderings ------------------------------------------------------------------------

    def _snapshot(self) -> list[tuple[JobKey, _JobEntry]]:
        with self._lock:
            return [
                (key, _JobEntry(e.analysis, e.text, e.restarts, e.phase, dict(e.scrape_errors), e.progress))
                for key, e in sorted(self._jobs.items())
            ]

    @staticmethod
    def _status_series(snapshot: list[tuple[JobKey, _JobEntry]]) -> dict[str, _Series]:
        restarts: _Series = []
        phases: _Series = []
        errors: _Series = []
        progress: dict[str, _Series] = {name: [] for name in PROGRESS_NAMES}
        for key, entry in snapshot:
            for name, rows in entry.progress.items():
                progress[name] += rows
            if entry.restarts is not None:
                restarts.append((list(key), float(entry.restarts)))
            if entry.phase is not None:
                phases.append(([*key, entry.phase], 1.0))
            errors += [([*key, pod], count) for pod, count in sorted(entry.scrape_errors.items())]
        return {
            "shardwise_job_restarts": restarts,
            "shardwise_job_phase": phases,
            "shardwise_scrape_errors": errors,
            **progress,
        }

    def render(self) -> bytes:
        """The exposition text (format 0.0.4) of every family, as ``generate_latest`` would print it."""
        snapshot = self._snapshot()
        status = self._status_series(snapshot)
        parts: list[str] = []
        for name, _, _, _ in FAMILIES:
            family = _TEXT[name]
            parts.append(family.header)
            if name in status:
                parts.append(family.lines(status[name]))
            else:
                parts.extend(entry.text.get(name, "") for _, entry in snapshot)
        return "".join(parts).encode()

    def describe(self) -> Iterator[Metric]:
        """The families without samples: lets a registry detect name clashes at registration."""
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        families = self._families()
        by_name = {name: fam for (name, _, _, _), fam in zip(FAMILIES, families, strict=True)}
        for key, entry in snapshot:
            if entry.analysis is not None:
                for name, rows in _analysis_series(key, entry.analysis).items():
                    for labels, value in rows:
                        by_name[name].add_metric(labels, value)
        for name, rows in self._status_series(snapshot).items():
            for labels, value in rows:
                by_name[name].add_metric(labels, value)
        return iter(families)

    @staticmethod
    def _families() -> list[GaugeMetricFamily | CounterMetricFamily]:
        out: list[GaugeMetricFamily | CounterMetricFamily] = []
        for name, mtype, help_text, labels in FAMILIES:
            cls = CounterMetricFamily if mtype == "counter" else GaugeMetricFamily
            out.append(cls(name, help_text, labels=labels))
        return out


def exposition(registry: CollectorRegistry, exporter: JobMetricsExporter) -> bytes:
    """The operator's ``/metrics`` body: its registry (operator health) plus the job metrics.

    ``exporter`` must not also be registered in ``registry`` (its series would appear twice).
    """
    return generate_latest(registry) + exporter.render()
