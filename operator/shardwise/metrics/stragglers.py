"""Straggler analysis: per-rank times against their peers, hysteresis, the StragglerDetected condition."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shardwise.metrics.condition_values import (
    REASON_INSUFFICIENT_DATA,
    REASON_NO_STRAGGLERS,
    REASON_STRAGGLER_FOUND,
    STRAGGLER_DETECTED,
    ConditionValue,
    named,
    pct,
)
from shardwise.metrics.ranks import RankIdentity, finite, median, median_without
from shardwise.metrics.settings import AnalysisSettings
from shardwise.metrics.windows import RankWindow, StragglerTrack


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


def straggler_condition(report: StragglerReport) -> ConditionValue:
    """``StragglerDetected``: True naming every straggler's rank, pod, node, GPU and score."""
    found = report.findings
    rule = (
        f"threshold {pct(report.threshold)} over the median step time of the other ranks of the "
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
            f"{len(found)} straggler(s) on node(s) {', '.join(nodes)}: {named(described)} ({rule}).",
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


def find_stragglers(
    windows: Mapping[int, RankWindow],
    tracks: Mapping[int, StragglerTrack],
    identities: Mapping[int, RankIdentity],
    settings: AnalysisSettings,
) -> tuple[dict[int, StragglerTrack], StragglerReport]:
    """Score every rank against its stage peers; the moved hysteresis tracks and the report."""
    # Per-rank window medians (robust to an outlier step), grouped by pipeline stage.
    medians: dict[int, float] = {}
    tokens: dict[int, float] = {}
    counts: dict[int, int] = {}
    for rank in identities:
        samples = windows[rank].samples
        times = sorted(finite(s.step_seconds for s in samples))
        counts[rank] = len(times)
        if len(times) >= settings.min_samples:
            medians[rank] = median(times)
        tps = sorted(finite(s.tokens_per_second for s in samples))
        if tps:
            tokens[rank] = median(tps)
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
            references[rank] = median_without(values, index)

    moved = dict(tracks)
    timings: list[RankTiming] = []
    for rank in sorted(identities):
        track = moved.get(rank, StragglerTrack())
        ref = references.get(rank)
        score = medians[rank] / ref if ref else None
        if score is not None and windows[rank].new_samples > 0:
            track = _next_track(track, score, settings)
            moved[rank] = track
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
    report = StragglerReport(
        ranks=tuple(timings),
        threshold=settings.straggler_threshold,
        consecutive_windows=settings.consecutive_windows,
        evaluated=len(references),
    )
    return moved, report
