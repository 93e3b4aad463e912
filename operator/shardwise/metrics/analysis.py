"""Pure straggler and memory-balance analysis of a job's per-rank trainer stats (docs/metrics.md).

Data flow, one scrape pass of one job (the operator's scrape loop does the I/O around it;
:func:`observe_pass` does all of it in one call)::

    text  --parse_trainer_metrics-->  RankSample*  --ingest-->  JobWindows
    JobWindows + PlanView + AnalysisSettings  --analyse-->  (JobWindows', JobAnalysis)
    JobAnalysis  --straggler_condition / memory_condition-->  ConditionValue (status.conditions)
    JobAnalysis  --exporter.JobMetricsExporter.update_job-->  /metrics

Everything here is a pure function of its arguments over frozen values: no I/O, no clock, no
kopf / kubernetes / aiohttp. The only state carried between passes is the ``JobWindows`` value
the caller keeps and hands back: a bounded window of samples per rank and the straggler
hysteresis counters.

Stragglers. A rank's step time over the window is the *median* of its window (one outlier step
moves a median by at most one position, so it cannot make a rank look slow). It is compared
with the median of the *other* ranks of its pipeline stage (a leave-one-out median: with two
ranks per stage the plain median is their mean, which would hide a 25 % slower rank behind a
20 % threshold). Stages are never compared with each other: the first and last stages carry the
embedding and the loss and are legitimately slower. A rank becomes a straggler after
``consecutive_windows`` passes (each with new samples) above ``1 + straggler_threshold`` and is
cleared after as many passes below ``1 + straggler_threshold / 2`` (hysteresis: a rank hovering
around the threshold does not flap the condition).

Memory. A GPU's used memory is its peak over the window (the first kind of
``USED_MEMORY_KINDS`` the trainer reports); its prediction is the plan's per-stage total, the
stage of rank r being ``r // (dp * tp)`` (the contract's rank order pp, dp, tp, TP fastest).
Imbalance is reported per pipeline stage and across the job as max / mean, (max - min) / max
(the CRD's ``memoryImbalanceThreshold`` measure, used by the condition) and the coefficient of
variation (population standard deviation / mean).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

#: Prefix of every trainer metric (trainer_image/shardwise_trainer/metrics.py).
TRAINER_PREFIX = "shardwise_trainer_"
#: ``shardwise_trainer_memory_bytes{kind}`` kinds taken as a GPU's used memory, first present wins:
#: the CUDA caching allocator's peak reservation (the peak of what the device holds for the
#: process's tensors, cached blocks included; the CUDA context and NCCL buffers, which the
#: plan's total counts as overhead, are seen by no torch counter), then the peak allocation, the
#: device's current use, and the CPU seam's ``peak_rss`` / ``rss`` (tests and the demo run on CPU,
#: where the prediction error compares process memory with a GPU plan and means little).
USED_MEMORY_KINDS: tuple[str, ...] = ("peak_reserved", "peak_allocated", "device_used", "peak_rss", "rss")
#: The measured device capacity kind (CUDA ``mem_get_info`` total); the plan's value otherwise.
CAPACITY_MEMORY_KIND = "device_total"
#: Every label a trainer series may carry (docs/trainer-metrics.md); a series with another is not
#: the trainer's and is rejected, so a page cannot invent label sets (and windows) of its own.
TRAINER_LABELS = frozenset({"namespace", "job", "pod", "node", "rank", "local_rank", "gpu", "stage", "kind"})
#: Why a trainer series was rejected (the ``reason`` of the operator's rejection counter).
REJECT_UNKNOWN_LABELS = "unknown_labels"
REJECT_RANK_OUT_OF_RANGE = "rank_out_of_range"

STRAGGLER_DETECTED = "StragglerDetected"
MEMORY_IMBALANCED = "MemoryImbalanced"
REASON_STRAGGLER_FOUND = "StragglerFound"
REASON_NO_STRAGGLERS = "NoStragglers"
REASON_MEMORY_IMBALANCED = "MemoryImbalanced"
REASON_MEMORY_BALANCED = "MemoryBalanced"
REASON_INSUFFICIENT_DATA = "InsufficientData"

#: At most this many ranks / stages are named in one condition message (the rest are counted).
MAX_NAMED = 8


class TrainerMetricsError(ValueError):
    """The trainer's stats text could not be parsed (counted as a scrape error by the caller)."""


# --------------------------------------------------------------------------- settings and plan


@dataclass(frozen=True, slots=True)
class AnalysisSettings:
    """Detection knobs; the first two come from ``spec.monitoring`` (see :meth:`from_monitoring`)."""

    straggler_threshold: float = 0.2
    memory_imbalance_threshold: float = 0.1
    consecutive_windows: int = 3
    window_size: int = 10
    min_samples: int = 3

    def __post_init__(self) -> None:
        if not self.straggler_threshold > 0:
            raise ValueError("straggler_threshold must be > 0")
        if not 0 < self.memory_imbalance_threshold <= 1:
            raise ValueError("memory_imbalance_threshold must be in (0, 1]")
        if self.consecutive_windows < 1 or self.window_size < 1:
            raise ValueError("consecutive_windows and window_size must be >= 1")
        if not 1 <= self.min_samples <= self.window_size:
            raise ValueError("min_samples must be in [1, window_size]")

    @classmethod
    def from_monitoring(cls, monitoring: Mapping[str, Any] | None, **overrides: Any) -> AnalysisSettings:
        """From a job's ``spec.monitoring`` (CRD defaults apply to absent keys)."""
        m = monitoring or {}
        return cls(
            straggler_threshold=float(m.get("stragglerThreshold", 0.2)),
            memory_imbalance_threshold=float(m.get("memoryImbalanceThreshold", 0.1)),
            **overrides,
        )


@dataclass(frozen=True, slots=True)
class StagePrediction:
    """``layout.json`` ``predicted.per_stage[i]``: bytes per GPU of one pipeline stage."""

    stage: int
    total_bytes: int
    model_state_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class PlanView:
    """The parts of ``layout.json`` the analysis needs (docs/layout-contract.md)."""

    tp: int
    pp: int
    dp: int
    capacity_bytes: int | None = None
    per_stage: tuple[StagePrediction, ...] = ()

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def stage_of(self, rank: int) -> int:
        """rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank (contract rank order)."""
        return rank // (self.dp * self.tp)

    def replica_of(self, rank: int) -> int:
        """The data-parallel replica (dp_rank) of a rank."""
        return (rank % (self.dp * self.tp)) // self.tp

    def prediction(self, stage: int) -> StagePrediction | None:
        return next((p for p in self.per_stage if p.stage == stage), None)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def plan_from_layout(layout: Mapping[str, Any]) -> PlanView:
    """A :class:`PlanView` of a ``layout.json`` document (the ``<job>-layout`` ConfigMap)."""
    lay = layout.get("layout") or {}
    predicted = layout.get("predicted") or {}
    stages = tuple(
        StagePrediction(
            stage=int(entry.get("stage", i)),
            total_bytes=int(entry.get("total") or 0),
            model_state_bytes=_opt_int(entry.get("model_state_bytes")),
        )
        for i, entry in enumerate(predicted.get("per_stage") or [])
    )
    return PlanView(
        tp=int(lay.get("tp", 1)),
        pp=int(lay.get("pp", 1)),
        dp=int(lay.get("dp", 1)),
        capacity_bytes=_opt_int(predicted.get("gpu_memory_bytes")),
        per_stage=stages,
    )


# --------------------------------------------------------------------------- samples and parsing


@dataclass(frozen=True, slots=True)
class RankIdentity:
    """Where a rank runs: what a finding names."""

    rank: int
    pod: str
    node: str
    gpu: str
    stage: int
    local_rank: int = 0

    def describe(self) -> str:
        return f"rank {self.rank} (pod {self.pod}, node {self.node}, GPU {self.gpu}, stage {self.stage})"


@dataclass(frozen=True, slots=True)
class RankSample:
    """One scrape of one rank: the trainer's ``shardwise_trainer_*`` gauges for that rank."""

    rank: int
    pod: str = ""
    node: str = ""
    gpu: str = ""
    local_rank: int = 0
    stage: int | None = None
    namespace: str = ""
    job: str = ""
    step: int | None = None
    step_seconds: float | None = None
    wait_seconds: float | None = None
    tokens_per_second: float | None = None
    memory_bytes: tuple[tuple[str, float], ...] = ()
    model_state_bytes: float | None = None
    predicted_model_state_bytes: float | None = None
    timestamp: float | None = None

    #: Derived once at construction (the analysis reads them on every pass over the window).
    used_bytes: float | None = field(init=False, default=None, compare=False)
    capacity_bytes: float | None = field(init=False, default=None, compare=False)

    def __post_init__(self) -> None:
        kinds = dict(self.memory_bytes)
        used = next((kinds[k] for k in USED_MEMORY_KINDS if k in kinds and math.isfinite(kinds[k])), None)
        object.__setattr__(self, "used_bytes", used)
        object.__setattr__(self, "capacity_bytes", kinds.get(CAPACITY_MEMORY_KIND))

    def memory(self, kind: str) -> float | None:
        return next((v for k, v in self.memory_bytes if k == kind), None)


_SCALAR_FIELDS = {
    "step": "step",
    "step_seconds": "step_seconds",
    "wait_seconds": "wait_seconds",
    "tokens_per_second": "tokens_per_second",
    "model_state_bytes": "model_state_bytes",
    "predicted_model_state_bytes": "predicted_model_state_bytes",
    "last_update_timestamp_seconds": "timestamp",
}


def _int_label(labels: Mapping[str, str], name: str) -> int | None:
    raw = labels.get(name, "")
    try:
        return int(raw)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ParsedPage:
    """One pod's stats page: its per-rank samples and the trainer series it had to reject."""

    samples: tuple[RankSample, ...]
    rejected: Mapping[str, int] = field(default_factory=dict)  # reason -> series


def parse_trainer_metrics(text: str) -> tuple[RankSample, ...]:
    """The per-rank samples of one pod's stats page, ordered by rank (see :func:`parse_page`)."""
    return parse_page(text).samples


def parse_page(text: str, world_size: int | None = None) -> ParsedPage:
    """The per-rank samples of one pod's stats page, ordered by rank, and what was rejected.

    Metrics that are not the trainer's and trainer series without a ``rank`` label are ignored.
    A trainer series with a label the trainer never sets, or a rank that is not in
    ``[0, world_size)`` (not a non-negative integer when the world size is unknown), is rejected
    and counted. Text that is not Prometheus exposition raises :class:`TrainerMetricsError`.
    """
    ranks: dict[int, dict[str, Any]] = {}
    rejected: dict[str, int] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises ValueError, IndexError, ... on malformed text
        raise TrainerMetricsError(f"not Prometheus text exposition: {exc}") from exc
    for family in families:
        if not family.name.startswith(TRAINER_PREFIX):
            continue
        short = family.name[len(TRAINER_PREFIX) :]
        for sample in family.samples:
            if "rank" not in sample.labels:
                continue
            if not sample.labels.keys() <= TRAINER_LABELS:
                rejected[REJECT_UNKNOWN_LABELS] = rejected.get(REJECT_UNKNOWN_LABELS, 0) + 1
                continue
            rank = _int_label(sample.labels, "rank")
            if rank is None or rank < 0 or (world_size is not None and rank >= world_size):
                rejected[REJECT_RANK_OUT_OF_RANGE] = rejected.get(REJECT_RANK_OUT_OF_RANGE, 0) + 1
                continue
            entry = ranks.get(rank)
            if entry is None:
                labels = sample.labels
                entry = ranks[rank] = {
                    "rank": rank,
                    "pod": labels.get("pod", ""),
                    "node": labels.get("node", ""),
                    "gpu": labels.get("gpu", ""),
                    "local_rank": _int_label(labels, "local_rank") or 0,
                    "stage": _int_label(labels, "stage"),
                    "namespace": labels.get("namespace", ""),
                    "job": labels.get("job", ""),
                    "memory": {},
                }
            value = float(sample.value)
            if short == "memory_bytes":
                entry["memory"][sample.labels.get("kind", "")] = value
            elif short in _SCALAR_FIELDS:
                entry[_SCALAR_FIELDS[short]] = value
    out = []
    for rank in sorted(ranks):
        entry = ranks[rank]
        memory = entry.pop("memory")
        step = entry.pop("step", None)
        out.append(
            RankSample(
                step=int(step) if step is not None and math.isfinite(step) else None,
                memory_bytes=tuple(sorted(memory.items())),
                **entry,
            )
        )
    return ParsedPage(tuple(out), rejected)


# --------------------------------------------------------------------------- windows


@dataclass(frozen=True, slots=True)
class RankWindow:
    """The last ``window_size`` distinct samples of one rank, oldest first.

    ``new_samples`` counts samples added since the last analysis pass: the straggler counters
    only move on passes that saw new steps, so scraping faster than the trainer steps does not
    count the same step twice.
    """

    samples: tuple[RankSample, ...] = ()
    new_samples: int = 0

    def add(self, sample: RankSample, size: int) -> RankWindow:
        if self.samples:
            last = self.samples[-1]
            same = (last.step, last.timestamp) == (sample.step, sample.timestamp)
            if same and (sample.step is not None or sample.timestamp is not None):
                return self  # the same step scraped again
        return RankWindow((*self.samples, sample)[-size:], self.new_samples + 1)


@dataclass(frozen=True, slots=True)
class StragglerTrack:
    """Hysteresis state of one rank: consecutive slow / clear windows and the current verdict."""

    slow_windows: int = 0
    clear_windows: int = 0
    flagged: bool = False


@dataclass(frozen=True, slots=True)
class JobWindows:
    """Everything the analysis carries from one pass to the next for one job."""

    windows: Mapping[int, RankWindow] = field(default_factory=dict)
    tracks: Mapping[int, StragglerTrack] = field(default_factory=dict)


def ingest(state: JobWindows, samples: Iterable[RankSample], settings: AnalysisSettings) -> JobWindows:
    """The windows with one scrape's samples appended (bounded to ``settings.window_size``)."""
    windows = dict(state.windows)
    for sample in samples:
        windows[sample.rank] = windows.get(sample.rank, RankWindow()).add(sample, settings.window_size)
    return replace(state, windows=windows)


def keep_ranks(state: JobWindows, ranks: Iterable[int]) -> JobWindows:
    """Only these ranks' windows and tracks (after a re-plan changed the world size)."""
    keep = set(ranks)
    return JobWindows(
        {r: w for r, w in state.windows.items() if r in keep},
        {r: t for r, t in state.tracks.items() if r in keep},
    )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class GpuMemory:
    """One GPU's memory against the plan."""

    identity: RankIdentity
    used_bytes: float
    predicted_bytes: float | None
    capacity_bytes: float | None
    model_state_bytes: float | None = None
    predicted_model_state_bytes: float | None = None

    @property
    def prediction_error_ratio(self) -> float | None:
        """(used - predicted) / predicted: positive when the GPU holds more than planned."""
        if not self.predicted_bytes:
            return None
        return (self.used_bytes - self.predicted_bytes) / self.predicted_bytes

    @property
    def model_state_error_ratio(self) -> float | None:
        if self.model_state_bytes is None or not self.predicted_model_state_bytes:
            return None
        return (self.model_state_bytes - self.predicted_model_state_bytes) / self.predicted_model_state_bytes

    @property
    def headroom_bytes(self) -> float | None:
        return None if self.capacity_bytes is None else self.capacity_bytes - self.used_bytes

    @property
    def headroom_ratio(self) -> float | None:
        if not self.capacity_bytes:
            return None
        return (self.capacity_bytes - self.used_bytes) / self.capacity_bytes


@dataclass(frozen=True, slots=True)
class Imbalance:
    """Spread of peak memory over a group of GPUs (a pipeline stage, or the whole job)."""

    stage: int | None  # None: the whole job
    gpus: int
    min_bytes: float
    max_bytes: float
    mean_bytes: float
    ratio: float  # max / mean
    spread: float  # (max - min) / max, the CRD's memoryImbalanceThreshold measure
    cv: float  # population standard deviation / mean
    heaviest: RankIdentity
    lightest: RankIdentity


@dataclass(frozen=True, slots=True)
class MemoryBalance:
    """The memory half of a job's analysis."""

    gpus: tuple[GpuMemory, ...]
    stages: tuple[Imbalance, ...]
    job: Imbalance | None
    threshold: float
    findings: tuple[Imbalance, ...]  # the stages whose spread exceeds the threshold


@dataclass(frozen=True, slots=True)
class RankTiming:
    """One rank's step time over its window against its stage."""

    identity: RankIdentity
    samples: int
    step_seconds: float | None  # median of the window
    tokens_per_second: float | None  # median of the window
    reference_seconds: float | None  # median of the other ranks of the stage
    score: float | None  # step_seconds / reference_seconds
    track: StragglerTrack

    @property
    def straggler(self) -> bool:
        return self.track.flagged


@dataclass(frozen=True, slots=True)
class StragglerReport:
    """The straggler half of a job's analysis."""

    ranks: tuple[RankTiming, ...]
    threshold: float
    consecutive_windows: int
    evaluated: int  # ranks that have a score (enough samples and a stage peer)

    @property
    def findings(self) -> tuple[RankTiming, ...]:
        return tuple(r for r in self.ranks if r.straggler)


@dataclass(frozen=True, slots=True)
class JobAnalysis:
    """One pass over one job: what the exporter renders and the conditions are built from."""

    memory: MemoryBalance
    stragglers: StragglerReport
    tokens_per_second: float | None  # the job's throughput: sum over data-parallel replicas


# --------------------------------------------------------------------------- the analysis


def _median(sorted_values: Sequence[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else (sorted_values[mid - 1] + sorted_values[mid]) / 2


def _median_without(sorted_values: Sequence[float], index: int) -> float:
    """Median of ``sorted_values`` with the element at ``index`` left out, in O(1)."""
    n = len(sorted_values) - 1

    def at(j: int) -> float:
        return sorted_values[j if j < index else j + 1]

    mid = n // 2
    return at(mid) if n % 2 else (at(mid - 1) + at(mid)) / 2


def _finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and -math.inf < v < math.inf]


def _identity(rank: int, latest: RankSample, plan: PlanView | None) -> RankIdentity:
    if plan is not None and rank < plan.world_size:
        stage = plan.stage_of(rank)
    else:
        stage = latest.stage if latest.stage is not None else 0
    return RankIdentity(rank, latest.pod, latest.node, latest.gpu, stage, latest.local_rank)


def _imbalance(stage: int | None, gpus: Sequence[GpuMemory]) -> Imbalance:
    used = [g.used_bytes for g in gpus]
    n = len(used)
    mean = math.fsum(used) / n
    lo, hi = min(used), max(used)
    variance = math.fsum((u - mean) ** 2 for u in used) / n
    heaviest = max(gpus, key=lambda g: (g.used_bytes, -g.identity.rank))
    lightest = min(gpus, key=lambda g: (g.used_bytes, g.identity.rank))
    return Imbalance(
        stage=stage,
        gpus=n,
        min_bytes=lo,
        max_bytes=hi,
        mean_bytes=mean,
        ratio=hi / mean if mean > 0 else 1.0,
        spread=(hi - lo) / hi if hi > 0 else 0.0,
        cv=math.sqrt(variance) / mean if mean > 0 else 0.0,
        heaviest=heaviest.identity,
        lightest=lightest.identity,
    )


def memory_balance(
    identities: Mapping[int, RankIdentity],
    windows: Mapping[int, RankWindow],
    plan: PlanView | None,
    threshold: float,
) -> MemoryBalance:
    """Per-GPU peak memory vs the plan, and the imbalance per stage and across the job."""
    gpus: list[GpuMemory] = []
    for rank in sorted(identities):
        samples = windows[rank].samples
        used = _finite(s.used_bytes for s in samples)
        if not used:
            continue
        ident = identities[rank]
        prediction = plan.prediction(ident.stage) if plan is not None else None
        capacity = _finite(s.capacity_bytes for s in samples)
        if not capacity and plan is not None and plan.capacity_bytes:
            capacity = [float(plan.capacity_bytes)]
        predicted = float(prediction.total_bytes) if prediction and prediction.total_bytes else None
        states = _finite(s.model_state_bytes for s in samples)
        predicted_states = _finite(s.predicted_model_state_bytes for s in samples)
        gpus.append(
            GpuMemory(
                identity=ident,
                used_bytes=max(used),
                predicted_bytes=predicted,
                capacity_bytes=capacity[-1] if capacity else None,
                model_state_bytes=max(states) if states else None,
                predicted_model_state_bytes=(
                    float(prediction.model_state_bytes)
                    if prediction and prediction.model_state_bytes
                    else (predicted_states[-1] if predicted_states else None)
                ),
            )
        )
    by_stage: dict[int, list[GpuMemory]] = {}
    for g in gpus:
        by_stage.setdefault(g.identity.stage, []).append(g)
    stages = tuple(_imbalance(stage, members) for stage, members in sorted(by_stage.items()))
    return MemoryBalance(
        gpus=tuple(gpus),
        stages=stages,
        job=_imbalance(None, gpus) if gpus else None,
        threshold=threshold,
        findings=tuple(s for s in stages if s.gpus >= 2 and s.spread > threshold),
    )


def _next_track(track: StragglerTrack, score: float, settings: AnalysisSettings) -> StragglerTrack:
    k = settings.consecutive_windows
    if score > 1 + settings.straggler_threshold:
        slow, clear = track.slow_windows + 1, 0
    elif score < 1 + settings.straggler_threshold / 2:
        slow, clear = 0, track.clear_windows + 1
    else:  # in the hysteresis band: neither counts
        slow, clear = 0, 0
    flagged = (slow >= k) if not track.flagged else (clear < k)
    return StragglerTrack(slow, clear, flagged)


def analyse(
    state: JobWindows, plan: PlanView | None, settings: AnalysisSettings
) -> tuple[JobWindows, JobAnalysis]:
    """One analysis pass: the next state (counters moved, new-sample counts reset) and the result.

    With a plan, ranks outside its world size (left over from an earlier layout) are dropped.
    """
    if plan is not None and any(rank >= plan.world_size for rank in state.windows):
        state = keep_ranks(state, range(plan.world_size))
    identities = {
        rank: _identity(rank, w.samples[-1], plan) for rank, w in state.windows.items() if w.samples
    }
    # Per-rank window medians (robust to an outlier step), grouped by pipeline stage.
    medians: dict[int, float] = {}
    tokens: dict[int, float] = {}
    counts: dict[int, int] = {}
    for rank in identities:
        samples = state.windows[rank].samples
        times = sorted(_finite(s.step_seconds for s in samples))
        counts[rank] = len(times)
        if len(times) >= settings.min_samples:
            medians[rank] = _median(times)
        tps = sorted(_finite(s.tokens_per_second for s in samples))
        if tps:
            tokens[rank] = _median(tps)
    groups: dict[int, list[int]] = {}
    for rank in medians:
        groups.setdefault(identities[rank].stage, []).append(rank)
    references: dict[int, float] = {}
    for members in groups.values():
        if len(members) < 2:
            continue  # a stage of one rank has no peer to be compared with
        ordered = sorted(members, key=lambda r: medians[r])
        values = [medians[r] for r in ordered]
        for index, rank in enumerate(ordered):
            references[rank] = _median_without(values, index)

    tracks = dict(state.tracks)
    timings: list[RankTiming] = []
    for rank in sorted(identities):
        track = tracks.get(rank, StragglerTrack())
        ref = references.get(rank)
        score = medians[rank] / ref if ref else None
        if score is not None and state.windows[rank].new_samples > 0:
            track = _next_track(track, score, settings)
            tracks[rank] = track
        timings.append(
            RankTiming(
                identity=identities[rank],
                samples=counts[rank],
                step_seconds=medians.get(rank),
                tokens_per_second=tokens.get(rank),
                reference_seconds=ref,
                score=score,
                track=track,
            )
        )

    # Job throughput: each data-parallel replica goes at its slowest rank's pace.
    replicas: dict[int, float] = {}
    for rank, value in tokens.items():
        replica = plan.replica_of(rank) if plan is not None and rank < plan.world_size else rank
        replicas[replica] = min(value, replicas.get(replica, math.inf))
    throughput = math.fsum(replicas.values()) if replicas else None

    next_state = JobWindows(
        {r: (replace(w, new_samples=0) if w.new_samples else w) for r, w in state.windows.items()},
        tracks,
    )
    analysis = JobAnalysis(
        memory=memory_balance(identities, state.windows, plan, settings.memory_imbalance_threshold),
        stragglers=StragglerReport(
            ranks=tuple(timings),
            threshold=settings.straggler_threshold,
            consecutive_windows=settings.consecutive_windows,
            evaluated=len(references),
        ),
        tokens_per_second=throughput,
    )
    return next_state, analysis


# --------------------------------------------------------------------------- conditions


@dataclass(frozen=True, slots=True)
class ConditionValue:
    """A status condition to set (``shardwise.conditions.set_condition`` takes these fields)."""

    type: str
    status: bool
    reason: str
    message: str


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def _pct(value: float) -> str:
    return f"{value * 100:.1f} %"


def _named(items: Sequence[str]) -> str:
    shown = "; ".join(items[:MAX_NAMED])
    rest = len(items) - MAX_NAMED
    return shown + (f"; and {rest} more" if rest > 0 else "")


def straggler_condition(report: StragglerReport) -> ConditionValue:
    """``StragglerDetected``: True naming every straggler's rank, pod, node, GPU and score."""
    found = report.findings
    rule = (
        f"threshold {_pct(report.threshold)} over the median step time of the other ranks of the "
        f"same pipeline stage, {report.consecutive_windows} consecutive windows"
    )
    if found:
        described = [
            f"{r.identity.describe()} takes {r.step_seconds or 0:.3g} s per step, "
            f"{r.score or 0:.2f}x its stage's {r.reference_seconds or 0:.3g} s"
            for r in sorted(found, key=lambda r: -(r.score or 0))
        ]
        nodes = sorted({r.identity.node for r in found})
        return ConditionValue(
            STRAGGLER_DETECTED,
            True,
            REASON_STRAGGLER_FOUND,
            f"{len(found)} straggler(s) on node(s) {', '.join(nodes)}: {_named(described)} ({rule}).",
        )
    if report.evaluated == 0:
        waiting = sum(1 for r in report.ranks if r.step_seconds is None)
        detail = (
            f"{waiting} of {len(report.ranks)} ranks have fewer step-time samples than needed"
            if waiting
            else "no pipeline stage has two ranks reporting step times to compare"
        )
        if not report.ranks:
            detail = "no rank has reported step times yet"
        return ConditionValue(STRAGGLER_DETECTED, False, REASON_INSUFFICIENT_DATA, f"Cannot judge: {detail}.")
    return ConditionValue(
        STRAGGLER_DETECTED,
        False,
        REASON_NO_STRAGGLERS,
        f"No straggler among {report.evaluated} compared ranks ({rule}).",
    )


def memory_condition(balance: MemoryBalance) -> ConditionValue:
    """``MemoryImbalanced``: True naming, per imbalanced stage, the heaviest and lightest GPU."""
    if balance.findings:
        described = [
            f"stage {s.stage}: spread {_pct(s.spread)} (max/mean {s.ratio:.2f}), "
            f"{s.heaviest.describe()} peaks at {_gib(s.max_bytes)}, "
            f"{s.lightest.describe()} at {_gib(s.min_bytes)}"
            for s in sorted(balance.findings, key=lambda s: -s.spread)
        ]
        return ConditionValue(
            MEMORY_IMBALANCED,
            True,
            REASON_MEMORY_IMBALANCED,
            f"Peak GPU memory differs by more than {_pct(balance.threshold)} within "
            f"{len(balance.findings)} pipeline stage(s): {_named(described)}.",
        )
    compared = [s for s in balance.stages if s.gpus >= 2]
    if not compared:
        return ConditionValue(
            MEMORY_IMBALANCED,
            False,
            REASON_INSUFFICIENT_DATA,
            "Cannot judge: no pipeline stage has two GPUs reporting memory yet.",
        )
    worst = max(compared, key=lambda s: s.spread)
    return ConditionValue(
        MEMORY_IMBALANCED,
        False,
        REASON_MEMORY_BALANCED,
        f"Peak GPU memory within {_pct(balance.threshold)} in every pipeline stage "
        f"({balance.job.gpus if balance.job else 0} GPUs; largest spread {_pct(worst.spread)} "
        f"in stage {worst.stage}).",
    )


# --------------------------------------------------------------------------- one scrape pass


@dataclass(frozen=True, slots=True)
class PassOutcome:
    """Everything one scrape pass of one job yields, for the scrape loop to act on."""

    state: JobWindows  # keep it for the next pass
    analysis: JobAnalysis  # JobMetricsExporter.update_job
    failed_pods: tuple[str, ...]  # JobMetricsExporter.record_scrape_error, one per pod
    errors: tuple[str, ...]  # "pod: why", for the log
    rejected: tuple[tuple[str, str, int], ...]  # (pod, reason, series) the pages had to reject
    straggler: ConditionValue
    memory: ConditionValue

    @property
    def conditions(self) -> tuple[ConditionValue, ConditionValue]:
        return (self.straggler, self.memory)


def page_limit(plan: PlanView | None, world_size: int | None) -> int | None:
    """The world size a page's ranks must fall in: the plan's, else the job's (status.layout.gpus)."""
    return plan.world_size if plan is not None else world_size


def observe_pass(
    state: JobWindows,
    pages: Mapping[str, str | ParsedPage | BaseException | None],
    plan: PlanView | None,
    settings: AnalysisSettings,
    world_size: int | None = None,
) -> PassOutcome:
    """Parse every pod's stats page, ingest, analyse, and derive both conditions.

    ``pages`` maps each pod name to the text it served (or that text already parsed by
    :func:`parse_page` with :func:`page_limit`'s world size, e.g. in another process), or to the
    exception / None when the request failed. A failed or unparsable page is reported, never
    fatal: the other pods' samples are still ingested and the ranks of the failed pod keep their
    last window. Ranks outside the plan's world size (``world_size`` without a plan) are rejected,
    as are foreign label sets: a page that rejected series counts as failed.
    """
    failed: list[str] = []
    errors: list[str] = []
    rejected: list[tuple[str, str, int]] = []
    samples: list[RankSample] = []
    limit = page_limit(plan, world_size)
    for pod in sorted(pages):
        page = pages[pod]
        if page is None or isinstance(page, BaseException):
            failed.append(pod)
            errors.append(f"{pod}: {page if page is not None else 'no answer'}")
            continue
        try:
            parsed = page if isinstance(page, ParsedPage) else parse_page(page, limit)
        except TrainerMetricsError as exc:
            failed.append(pod)
            errors.append(f"{pod}: {exc}")
            continue
        samples.extend(parsed.samples)
        if parsed.rejected:
            failed.append(pod)
            rejected.extend((pod, reason, count) for reason, count in sorted(parsed.rejected.items()))
            described = ", ".join(f"{count} {reason}" for reason, count in sorted(parsed.rejected.items()))
            errors.append(f"{pod}: rejected series ({described}; world size {limit})")
    state = ingest(state, samples, settings)
    state, analysis = analyse(state, plan, settings)
    return PassOutcome(
        state=state,
        analysis=analysis,
        failed_pods=tuple(failed),
        errors=tuple(errors),
        rejected=tuple(rejected),
        straggler=straggler_condition(analysis.stragglers),
        memory=memory_condition(analysis.memory),
    )
