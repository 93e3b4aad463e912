"""One analysis pass of a job: stragglers, memory balance and both conditions (docs/metrics.md)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from shardwise.metrics.condition_values import (
    MAX_NAMED,
    MEMORY_IMBALANCED,
    REASON_INSUFFICIENT_DATA,
    REASON_MEMORY_BALANCED,
    REASON_MEMORY_IMBALANCED,
    REASON_NO_STRAGGLERS,
    REASON_STRAGGLER_FOUND,
    STRAGGLER_DETECTED,
    ConditionValue,
)
from shardwise.metrics.memory_balance import (
    GpuMemory,
    Imbalance,
    MemoryBalance,
    memory_balance,
    memory_condition,
)
from shardwise.metrics.plan_view import PlanView, StagePrediction, plan_from_layout
from shardwise.metrics.ranks import RankIdentity, finite, identity_of, median
from shardwise.metrics.settings import AnalysisSettings
from shardwise.metrics.stragglers import RankTiming, StragglerReport, find_stragglers, straggler_condition
from shardwise.metrics.trainer_page import (
    CAPACITY_MEMORY_KIND,
    REJECT_RANK_OUT_OF_RANGE,
    REJECT_UNKNOWN_LABELS,
    TRAINER_LABELS,
    TRAINER_PREFIX,
    USED_MEMORY_KINDS,
    ParsedPage,
    RankSample,
    TrainerMetricsError,
    parse_page,
    parse_trainer_metrics,
)
from shardwise.metrics.windows import JobWindows, RankWindow, StragglerTrack, ingest, keep_ranks

# The analysis's names, importable from here as before the split into modules.
__all__ = [
    "CAPACITY_MEMORY_KIND",
    "MAX_NAMED",
    "MEMORY_IMBALANCED",
    "REASON_INSUFFICIENT_DATA",
    "REASON_MEMORY_BALANCED",
    "REASON_MEMORY_IMBALANCED",
    "REASON_NO_STRAGGLERS",
    "REASON_STRAGGLER_FOUND",
    "REJECT_RANK_OUT_OF_RANGE",
    "REJECT_UNKNOWN_LABELS",
    "STRAGGLER_DETECTED",
    "TRAINER_LABELS",
    "TRAINER_PREFIX",
    "USED_MEMORY_KINDS",
    "AnalysisSettings",
    "ConditionValue",
    "GpuMemory",
    "Imbalance",
    "JobAnalysis",
    "JobWindows",
    "MemoryBalance",
    "ParsedPage",
    "PassOutcome",
    "PlanView",
    "RankIdentity",
    "RankSample",
    "RankTiming",
    "RankWindow",
    "StagePrediction",
    "StragglerReport",
    "StragglerTrack",
    "TrainerMetricsError",
    "analyse",
    "ingest",
    "keep_ranks",
    "memory_balance",
    "memory_condition",
    "observe_pass",
    "page_limit",
    "parse_page",
    "parse_trainer_metrics",
    "plan_from_layout",
    "straggler_condition",
]


@dataclass(frozen=True, slots=True)
class JobAnalysis:
    """One pass over one job: what the exporter renders and the conditions are built from."""

    memory: MemoryBalance
    stragglers: StragglerReport
    tokens_per_second: float | None  # the job's throughput: sum over data-parallel replicas


def analyse(
    state: JobWindows, plan: PlanView | None, settings: AnalysisSettings
) -> tuple[JobWindows, JobAnalysis]:
    """One analysis pass: the next state (counters moved, new-sample counts reset) and the result.

    With a plan, ranks outside its world size (left over from an earlier layout) are dropped.
    """
    if plan is not None and any(rank >= plan.world_size for rank in state.windows):
        state = keep_ranks(state, range(plan.world_size))
    identities = {
        rank: identity_of(rank, w.samples[-1], plan) for rank, w in state.windows.items() if w.samples
    }
    tracks, stragglers = find_stragglers(state.windows, state.tracks, identities, settings)

    # Job throughput: each data-parallel replica goes at its slowest rank's pace.
    replicas: dict[int, float] = {}
    for rank in identities:
        tps = sorted(finite(s.tokens_per_second for s in state.windows[rank].samples))
        if not tps:
            continue
        replica = plan.replica_of(rank) if plan is not None and rank < plan.world_size else rank
        replicas[replica] = min(median(tps), replicas.get(replica, math.inf))
    throughput = math.fsum(replicas.values()) if replicas else None

    next_state = JobWindows(
        {r: (replace(w, new_samples=0) if w.new_samples else w) for r, w in state.windows.items()},
        tracks,
    )
    analysis = JobAnalysis(
        memory=memory_balance(identities, state.windows, plan, settings.memory_imbalance_threshold),
        stragglers=stragglers,
        tokens_per_second=throughput,
    )
    return next_state, analysis


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
