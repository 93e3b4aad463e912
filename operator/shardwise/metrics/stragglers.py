"""Straggler analysis: per-rank times against their peers, hysteresis, the StragglerDetected condition."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

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
from shardwise.metrics.settings import SIGNAL_COMPUTE, SIGNAL_STEP, AnalysisSettings
from shardwise.metrics.trainer_page import RankSample
from shardwise.metrics.windows import RankWindow, StragglerTrack

#: What a rank's score compares it with.
BASIS_STAGE: Final = "stage"  # its signal against the other ranks of its pipeline stage
BASIS_STAGES: Final = "stages"  # its compute share of the step against the other stages' ranks


@dataclass(frozen=True, slots=True)
class RankTiming:
    """One rank's times over its window, and its score against its peers."""

    identity: RankIdentity
    samples: int  # samples of the compared signal in the window
    step_seconds: float | None  # median wall step time of the window
    tokens_per_second: float | None  # median of the window
    reference_seconds: float | None  # basis "stage": median signal of the stage's other ranks
    score: float | None  # value / reference (> 1: slower than its peers)
    track: StragglerTrack
    compute_seconds: float | None = None  # median compute time (outside collectives)
    communication_seconds: float | None = None  # median time inside collectives
    compute_share: float | None = None  # median compute / step time
    signal: str = SIGNAL_STEP  # the signal the rank's value is: Compute or Step
    basis: str = BASIS_STAGE
    value: float | None = None  # median signal (basis stage) or compute share (basis stages)
    reference: float | None = None  # the peers' median of the same

    @property
    def straggler(self) -> bool:
        return self.track.flagged


@dataclass(frozen=True, slots=True)
class StragglerReport:
    """The straggler half of a job's analysis."""

    ranks: tuple[RankTiming, ...]
    threshold: float
    consecutive_windows: int
    evaluated: int  # ranks that have a score (enough samples and a peer)
    signal: str = SIGNAL_STEP  # the signal asked for (ranks without compute times fall back)
    stage_threshold: float | None = None  # for ranks compared across stages (basis "stages")

    @property
    def findings(self) -> tuple[RankTiming, ...]:
        return tuple(r for r in self.ranks if r.straggler)


def _next_track(track: StragglerTrack, score: float, threshold: float, k: int) -> StragglerTrack:
    if score > 1 + threshold:
        slow, clear = track.slow_windows + 1, 0
    elif score < 1 + threshold / 2:
        slow, clear = 0, track.clear_windows + 1
    else:  # in the hysteresis band: neither counts
        slow, clear = 0, 0
    flagged = (slow >= k) if not track.flagged else (clear < k)
    return StragglerTrack(slow, clear, flagged)


def _described(r: RankTiming) -> str:
    if r.basis == BASIS_STAGES:
        return (
            f"{r.identity.describe()} computes {pct(r.value or 0)} of its step, "
            f"{r.score or 0:.2f}x the {pct(r.reference or 0)} of the other pipeline stages"
        )
    what = "computes" if r.signal == SIGNAL_COMPUTE else "takes"
    outside = " outside collectives" if r.signal == SIGNAL_COMPUTE else ""
    return (
        f"{r.identity.describe()} {what} {r.value or 0:.3g} s per step{outside}, "
        f"{r.score or 0:.2f}x its stage's {r.reference or 0:.3g} s"
    )


def _rule(report: StragglerReport) -> str:
    signal = "compute time (outside collectives)" if report.signal == SIGNAL_COMPUTE else "step time"
    rule = (
        f"threshold {pct(report.threshold)} over the median {signal} of the other ranks of the same "
        "pipeline stage"
    )
    if report.stage_threshold is not None:
        rule += (
            f", {pct(report.stage_threshold)} over the other stages' compute share of the step for a "
            "stage of one rank"
        )
    return f"{rule}, {report.consecutive_windows} consecutive windows"


def straggler_condition(report: StragglerReport) -> ConditionValue:
    """``StragglerDetected``: True naming every straggler's rank, pod, node, GPU and score."""
    found = report.findings
    rule = _rule(report)
    if found:
        described = [_described(r) for r in sorted(found, key=lambda r: -(r.score or 0))]
        nodes = sorted({r.identity.node for r in found})
        return ConditionValue(
            STRAGGLER_DETECTED,
            True,
            REASON_STRAGGLER_FOUND,
            f"{len(found)} straggler(s) on node(s) {', '.join(nodes)}: {named(described)} ({rule}).",
            nodes=tuple(nodes),
        )
    if report.evaluated == 0:
        waiting = sum(1 for r in report.ranks if r.value is None)
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


@dataclass(frozen=True, slots=True)
class _RankFigures:
    """A rank's window reduced to medians."""

    samples: int
    signal: str
    value: float | None  # median signal, once there are min_samples of it
    step: float | None
    compute: float | None
    communication: float | None
    share: float | None
    tokens: float | None


def _med(values: list[float]) -> float | None:
    return median(sorted(values)) if values else None


def _figures(samples: Sequence[RankSample], settings: AnalysisSettings) -> _RankFigures:
    computes = [s.compute_seconds for s in samples]
    use_compute = settings.straggler_signal == SIGNAL_COMPUTE and all(c is not None for c in computes)
    values = finite(computes if use_compute else [s.step_seconds for s in samples])
    shares = finite(
        s.compute_seconds / s.step_seconds
        for s in samples
        if s.compute_seconds is not None and s.step_seconds
    )
    return _RankFigures(
        samples=len(values),
        signal=SIGNAL_COMPUTE if use_compute else SIGNAL_STEP,
        value=_med(values) if len(values) >= settings.min_samples else None,
        step=_med(finite(s.step_seconds for s in samples)),
        compute=_med(finite(computes)),
        communication=_med(finite(s.communication_seconds for s in samples)),
        share=_med(shares) if use_compute and len(shares) >= settings.min_samples else None,
        tokens=_med(finite(s.tokens_per_second for s in samples)),
    )


def _leave_one_out(values: Mapping[int, float]) -> dict[int, float]:
    """Per key, the median of the other keys' values."""
    ordered = sorted(values, key=lambda r: values[r])
    sorted_values = [values[r] for r in ordered]
    return {rank: median_without(sorted_values, i) for i, rank in enumerate(ordered)}


def find_stragglers(
    windows: Mapping[int, RankWindow],
    tracks: Mapping[int, StragglerTrack],
    identities: Mapping[int, RankIdentity],
    settings: AnalysisSettings,
) -> tuple[dict[int, StragglerTrack], StragglerReport]:
    """Score every rank against its peers; the moved hysteresis tracks and the report.

    Within a pipeline stage every rank (data- and tensor-parallel peers) does the same work, so
    a rank's median signal is compared with the median of the others' (leave-one-out). A stage
    with one reporting rank (one DP replica, no TP) has no such peer: its ranks are compared
    across stages by the share of the step they spend computing (a slow stage computes for
    most of the step, the others wait for it in their receives), with ``stage_threshold``.
    """
    figures = {rank: _figures(windows[rank].samples, settings) for rank in identities}
    groups: dict[int, list[int]] = {}
    for rank, fig in figures.items():
        if fig.value is not None:
            groups.setdefault(identities[rank].stage, []).append(rank)
    references: dict[int, tuple[str, float]] = {}
    lonely: dict[int, float] = {}
    for members in groups.values():
        if len(members) >= 2:
            for rank, peers in _leave_one_out({r: figures[r].value or 0.0 for r in members}).items():
                references[rank] = (BASIS_STAGE, peers)
        elif figures[members[0]].share is not None:
            lonely[members[0]] = figures[members[0]].share or 0.0
    if len(lonely) >= 2:
        for rank, peers in _leave_one_out(lonely).items():
            references[rank] = (BASIS_STAGES, peers)

    moved = dict(tracks)
    timings: list[RankTiming] = []
    for rank in sorted(identities):
        fig = figures[rank]
        track = moved.get(rank, StragglerTrack())
        found = references.get(rank)
        basis, ref = found if found is not None else (BASIS_STAGE, None)
        value = fig.share if basis == BASIS_STAGES else fig.value
        score = value / ref if ref and value is not None else None
        if score is not None and windows[rank].new_samples > 0:
            threshold = settings.stage_threshold if basis == BASIS_STAGES else settings.straggler_threshold
            track = _next_track(track, score, threshold, settings.consecutive_windows)
            moved[rank] = track
        timings.append(
            RankTiming(
                identity=identities[rank],
                samples=fig.samples,
                step_seconds=fig.step,
                tokens_per_second=fig.tokens,
                reference_seconds=ref if basis == BASIS_STAGE else None,
                score=score,
                track=track,
                compute_seconds=fig.compute,
                communication_seconds=fig.communication,
                compute_share=fig.share,
                signal=fig.signal,
                basis=basis,
                value=value,
                reference=ref,
            )
        )
    report = StragglerReport(
        ranks=tuple(timings),
        threshold=settings.straggler_threshold,
        consecutive_windows=settings.consecutive_windows,
        evaluated=len(references),
        signal=settings.straggler_signal,
        stage_threshold=settings.stage_threshold if settings.straggler_signal == SIGNAL_COMPUTE else None,
    )
    return moved, report
