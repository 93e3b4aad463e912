"""Training progress from the scraped trainer stats: step, pace, measured MFU, loss, ETA (status.progress)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final

from shardwise.metrics.plan_view import PlanView
from shardwise.metrics.trainer_page import RankSample

#: Weight of the newest value in the smoothed loss and the smoothed seconds per step.
SMOOTHING: Final = 0.3
#: Default least time between two progress writes of one job (operator --progress-interval).
DEFAULT_PROGRESS_INTERVAL_SECONDS: Final = 30.0


@dataclass(frozen=True, slots=True)
class Observation:
    """One scrape pass of a job, all ranks folded into the job's figures."""

    step: int
    timestamp: float  # the trainer's Unix time of that step (newest rank)
    total_steps: int | None = None
    step_seconds: float | None = None  # slowest rank: step time + end-of-step wait
    compute_seconds: float | None = None  # slowest rank's compute time
    tokens_per_step: float | None = None
    samples_per_step: float | None = None
    loss: float | None = None
    validation_loss: float | None = None


def _finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _first(values: Iterable[float | None]) -> float | None:
    found = _finite(values)
    return found[0] if found else None


def observe(samples: Iterable[RankSample]) -> Observation | None:
    """The job's figures of one pass: the step every rank completed (the least), the slowest
    rank's step and compute time; None while no rank reported a step."""
    ranks = [s for s in samples if s.step is not None]
    if not ranks:
        return None
    walls = [s.step_seconds + (s.wait_seconds or 0.0) for s in ranks if s.step_seconds is not None]
    total = _first(s.total_steps for s in ranks)
    return Observation(
        step=min(s.step for s in ranks if s.step is not None),
        timestamp=max(_finite(s.timestamp for s in ranks), default=0.0),
        total_steps=int(total) if total is not None else None,
        step_seconds=max(_finite(walls), default=None),
        compute_seconds=max(_finite(s.compute_seconds for s in ranks), default=None),
        tokens_per_step=_first(s.tokens_per_step for s in ranks),
        samples_per_step=_first(s.samples_per_step for s in ranks),
        loss=_first(s.loss for s in sorted(ranks, key=lambda s: s.rank)),
        validation_loss=_first(s.validation_loss for s in sorted(ranks, key=lambda s: s.rank)),
    )


def ema(previous: float | None, value: float | None, weight: float = SMOOTHING) -> float | None:
    """Exponential moving average; the first value starts it, a missing value keeps it."""
    if value is None or not math.isfinite(value):
        return previous
    return value if previous is None else previous + weight * (value - previous)


def mfu(
    flops_per_step: float | None, seconds_per_step: float | None, gpus: int, peak_flops: float | None
) -> float | None:
    """Model FLOPs utilisation: the model's FLOPs per second over the GPUs' combined peak."""
    if not flops_per_step or not seconds_per_step or not peak_flops or gpus < 1:
        return None
    return flops_per_step / (seconds_per_step * gpus * peak_flops)


def eta_seconds(step: int, total_steps: int | None, seconds_per_step: float | None) -> float | None:
    """Seconds until the last step at the current pace (0 once it is reached)."""
    if total_steps is None or seconds_per_step is None:
        return None
    return max(0, total_steps - step) * seconds_per_step


def human_seconds(seconds: float) -> str:
    """``1h02m``, ``3m20s``, ``45s``: the ETA printer column."""
    s = max(0, round(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Tracker:
    """What is kept across passes of one attempt: the last observation and the smoothed figures."""

    last: Observation | None = None
    smoothed_loss: float | None = None
    # Smoothed wall seconds per step between two observations (checkpoints, evaluations and
    # scrape gaps included: what the ETA and the throughput are about).
    seconds_per_step: float | None = None


def advance(tracker: Tracker, obs: Observation | None) -> Tracker:
    """The tracker after one more pass (a pass without a new step changes nothing)."""
    if obs is None:
        return tracker
    last = tracker.last
    if last is not None and obs.step <= last.step:
        return replace(
            tracker, last=replace(last, validation_loss=obs.validation_loss or last.validation_loss)
        )
    pace = tracker.seconds_per_step
    if last is not None and obs.timestamp > last.timestamp:
        pace = ema(pace, (obs.timestamp - last.timestamp) / (obs.step - last.step))
    return Tracker(obs, ema(tracker.smoothed_loss, obs.loss), pace)


_BOUND = 1e12


def _round(value: float | None, digits: int = 4) -> float | None:
    """Significant digits: status values change only when the figure does (fewer writes, easy reading)."""
    if value is None or not math.isfinite(value):
        return None
    value = max(-_BOUND, min(_BOUND, value))  # the CRD's bounds: one wild figure must not fail the patch
    return float(f"{value:.{digits}g}")


def progress_status(tracker: Tracker, plan: PlanView | None, gpus: int | None) -> dict[str, Any] | None:
    """The ``status.progress`` object (CRD field order, units in the names); None before a step."""
    obs = tracker.last
    if obs is None:
        return None
    pace = tracker.seconds_per_step or obs.step_seconds
    world = gpus or (plan.world_size if plan else 0)
    out: dict[str, Any] = {"step": obs.step}
    if obs.total_steps:
        out["totalSteps"] = obs.total_steps
        out["percent"] = min(100, math.floor(100 * obs.step / obs.total_steps))
        out["summary"] = f"{out['percent']}% ({obs.step}/{obs.total_steps})"
    remaining = eta_seconds(obs.step, obs.total_steps, pace)
    if remaining is not None:
        out["remaining"] = human_seconds(remaining)
        out["remainingSeconds"] = round(remaining)
        out["eta"] = rfc3339(obs.timestamp + remaining)
    if pace and obs.tokens_per_step:
        out["tokensPerSecond"] = _round(obs.tokens_per_step / pace)
    if pace and obs.samples_per_step:
        out["samplesPerSecond"] = _round(obs.samples_per_step / pace)
    measured = mfu(
        plan.model_flops_per_step if plan else None, pace, world, plan.gpu_peak_flops if plan else None
    )
    if measured is not None and plan is not None:
        out["mfu"] = _round(measured, 3)
        if plan.mfu is not None:
            out["plannedMfu"] = plan.mfu
        out["mfuGpu"] = plan.gpu or "unknown"
    if plan is not None and plan.step_seconds is not None:
        out["predictedStepSeconds"] = _round(plan.step_seconds)
    for key, value in (
        ("measuredStepSeconds", obs.step_seconds),
        ("computeSeconds", obs.compute_seconds),
        ("loss", obs.loss),
        ("smoothedLoss", tracker.smoothed_loss),
        ("validationLoss", obs.validation_loss),
    ):
        rounded = _round(value)
        if rounded is not None:
            out[key] = rounded
    if obs.timestamp:
        out["lastUpdateTime"] = rfc3339(obs.timestamp)
    return out


def finished_progress(progress: Mapping[str, Any] | None, now: str) -> dict[str, Any] | None:
    """The job succeeded: every pod exited 0 after the trainer's last step, so progress is 100 %
    (the last scraped figures may predate the final steps)."""
    if not progress:
        return None
    out = dict(progress)
    if out.get("totalSteps"):
        out.update(
            step=out["totalSteps"], percent=100, summary=f"100% ({out['totalSteps']}/{out['totalSteps']})"
        )
    out.update(remaining="0s", remainingSeconds=0, eta=now)
    return out


def due(step: int, total_steps: int | None, *, since_last_write: float | None, interval: float) -> bool:
    """Write progress now? At most once per ``interval`` seconds per job, but the last step at once."""
    if since_last_write is None or since_last_write >= interval:
        return True
    return total_steps is not None and step >= total_steps
