"""status.progress arithmetic: MFU, ETA, smoothing, the fold over ranks, the write bound, the series."""

from __future__ import annotations

import math

import pytest

from shardwise.metrics.plan_view import PlanView
from shardwise.metrics.progress import (
    Observation,
    Tracker,
    advance,
    due,
    ema,
    eta_seconds,
    finished_progress,
    human_seconds,
    mfu,
    observe,
    progress_status,
)
from shardwise.metrics.progress_metrics import progress_series
from shardwise.metrics.trainer_page import RankSample


@pytest.mark.parametrize(
    ("flops", "seconds", "gpus", "peak", "expected"),
    [
        (4e15, 10.0, 8, 1e15, 0.05),  # 4e14 FLOP/s over 8e15 peak
        (312e12 * 0.4 * 2, 1.0, 2, 312e12, 0.4),  # exactly the planner's assumption
        (1e12, 2.0, 1, 1e12, 0.5),
        (None, 1.0, 1, 1e12, None),  # no model FLOPs in the plan
        (1e12, None, 1, 1e12, None),  # no pace yet
        (1e12, 1.0, 0, 1e12, None),  # no GPUs known
        (1e12, 1.0, 1, None, None),  # no peak
    ],
)
def test_mfu(
    flops: float | None, seconds: float | None, gpus: int, peak: float | None, expected: float | None
) -> None:
    got = mfu(flops, seconds, gpus, peak)
    assert got == pytest.approx(expected) if expected is not None else got is None


@pytest.mark.parametrize(
    ("step", "total", "pace", "expected"),
    [
        (40, 100, 2.0, 120.0),
        (100, 100, 2.0, 0.0),
        (120, 100, 2.0, 0.0),  # resumed past --steps: nothing left, never negative
        (0, 10, 0.5, 5.0),
        (5, None, 1.0, None),  # total unknown
        (5, 10, None, None),  # pace unknown
    ],
)
def test_eta_seconds(step: int, total: int | None, pace: float | None, expected: float | None) -> None:
    assert eta_seconds(step, total, pace) == expected


@pytest.mark.parametrize(
    ("previous", "value", "expected"),
    [
        (None, 4.0, 4.0),  # the first value starts the average
        (4.0, 2.0, 4.0 + 0.3 * (2.0 - 4.0)),
        (4.0, None, 4.0),  # a missing value keeps it
        (4.0, math.nan, 4.0),  # so does a NaN loss
        (None, None, None),
    ],
)
def test_ema(previous: float | None, value: float | None, expected: float | None) -> None:
    assert ema(previous, value) == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (45.4, "45s"), (200, "3m20s"), (3720, "1h02m"), (90000, "1d01h"), (-3, "0s")],
)
def test_human_seconds(seconds: float, text: str) -> None:
    assert human_seconds(seconds) == text


def _rank(rank: int, step: int, **kw: float) -> RankSample:
    base = {"step_seconds": 1.0, "wait_seconds": 0.0, "timestamp": 1000.0, "total_steps": 10.0}
    return RankSample(rank=rank, step=step, **{**base, **kw})  # type: ignore[arg-type]


def test_observe_folds_ranks_into_the_job() -> None:
    obs = observe(
        [
            _rank(1, 5, step_seconds=1.5, wait_seconds=0.1, compute_seconds=1.2, loss=2.5, timestamp=1001.0),
            _rank(
                0, 6, step_seconds=1.0, wait_seconds=0.5, compute_seconds=0.8, loss=2.0, tokens_per_step=64.0
            ),
        ]
    )
    assert obs is not None
    assert obs.step == 5  # the step every rank completed
    assert obs.step_seconds == pytest.approx(1.6)  # slowest rank, wait included
    assert obs.compute_seconds == 1.2
    assert obs.loss == 2.0  # rank 0's
    assert obs.total_steps == 10 and obs.tokens_per_step == 64.0 and obs.timestamp == 1001.0
    assert observe([RankSample(rank=0)]) is None  # no step reported yet


def test_pace_and_smoothed_loss_follow_the_steps() -> None:
    t = advance(Tracker(), Observation(step=2, timestamp=100.0, loss=4.0, step_seconds=1.0))
    assert t.seconds_per_step is None and t.smoothed_loss == 4.0
    t = advance(t, Observation(step=6, timestamp=108.0, loss=2.0))  # 4 steps in 8 s
    assert t.seconds_per_step == pytest.approx(2.0)
    assert t.smoothed_loss == pytest.approx(4.0 + 0.3 * (2.0 - 4.0))
    same = advance(t, Observation(step=6, timestamp=109.0, loss=9.0, validation_loss=1.5))
    assert same.seconds_per_step == t.seconds_per_step and same.smoothed_loss == t.smoothed_loss
    assert same.last is not None and same.last.validation_loss == 1.5  # a late evaluation is kept
    t = advance(t, Observation(step=10, timestamp=112.0))  # 1 s per step now
    assert t.seconds_per_step == pytest.approx(2.0 + 0.3 * (1.0 - 2.0))


PLAN = PlanView(
    tp=1,
    pp=1,
    dp=2,
    step_seconds=0.25,
    model_flops_per_step=1e12,
    gpu="A100-80GB",
    gpu_peak_flops=1e12,
    mfu=0.4,
)


def test_progress_status_fields_and_eta() -> None:
    tracker = Tracker(
        last=Observation(
            step=4,
            timestamp=1_700_000_000.0,
            total_steps=10,
            step_seconds=1.9,
            compute_seconds=1.5,
            tokens_per_step=512.0,
            samples_per_step=4.0,
            loss=2.0,
            validation_loss=2.2,
        ),
        smoothed_loss=2.5,
        seconds_per_step=2.0,
    )
    got = progress_status(tracker, PLAN, 2)
    assert got == {
        "step": 4,
        "totalSteps": 10,
        "percent": 40,
        "summary": "40% (4/10)",
        "remaining": "12s",
        "remainingSeconds": 12,
        "eta": "2023-11-14T22:13:32Z",  # the step's time + 6 steps × 2 s
        "tokensPerSecond": 256.0,
        "samplesPerSecond": 2.0,
        "mfu": 0.25,  # 1e12 FLOPs / (2 s × 2 GPUs × 1e12)
        "plannedMfu": 0.4,
        "mfuGpu": "A100-80GB",
        "predictedStepSeconds": 0.25,
        "measuredStepSeconds": 1.9,
        "computeSeconds": 1.5,
        "loss": 2.0,
        "smoothedLoss": 2.5,
        "validationLoss": 2.2,
        "lastUpdateTime": "2023-11-14T22:13:20Z",
    }
    # Before a second observation the pace is the measured step time; without a plan no MFU.
    first = progress_status(
        Tracker(last=Observation(step=1, timestamp=0.0, total_steps=3, step_seconds=2.0)), None, 2
    )
    assert first is not None and first["remainingSeconds"] == 4 and "mfu" not in first
    assert progress_status(Tracker(), PLAN, 2) is None


def test_finished_progress_is_100_percent() -> None:
    done = finished_progress(
        {"step": 8, "totalSteps": 10, "percent": 80, "remainingSeconds": 4}, "2026-01-01T00:00:00Z"
    )
    assert done is not None
    assert (done["step"], done["percent"], done["summary"], done["remainingSeconds"], done["eta"]) == (
        10,
        100,
        "100% (10/10)",
        0,
        "2026-01-01T00:00:00Z",
    )
    assert finished_progress(None, "2026-01-01T00:00:00Z") is None


@pytest.mark.parametrize(
    ("step", "total", "since", "interval", "expected"),
    [
        (3, 10, None, 30.0, True),  # never written
        (3, 10, 10.0, 30.0, False),  # within the interval: wait
        (3, 10, 30.0, 30.0, True),
        (10, 10, 1.0, 30.0, True),  # the last step is written at once
        (3, None, 5.0, 30.0, False),
    ],
)
def test_progress_writes_are_bounded(
    step: int, total: int | None, since: float | None, interval: float, expected: bool
) -> None:
    assert due(step, total, since_last_write=since, interval=interval) is expected


def test_progress_series() -> None:
    series = progress_series(
        ("ml", "tiny"),
        {
            "step": 5,
            "totalSteps": 10,
            "mfu": 0.3,
            "predictedStepSeconds": 1.0,
            "measuredStepSeconds": 1.5,
            "loss": 2.0,
            "eta": "2026-01-01T00:00:00Z",
        },
        deadline=1_767_225_600.0,
    )
    assert series["shardwise_job_progress_ratio"] == [(["ml", "tiny"], 0.5)]
    assert series["shardwise_job_step_seconds"] == [
        (["ml", "tiny", "predicted"], 1.0),
        (["ml", "tiny", "measured"], 1.5),
    ]
    assert series["shardwise_job_loss"] == [(["ml", "tiny", "latest"], 2.0)]
    assert series["shardwise_job_eta_timestamp_seconds"] == [(["ml", "tiny"], 1_767_225_600.0)]
    assert series["shardwise_job_deadline_timestamp_seconds"] == [(["ml", "tiny"], 1_767_225_600.0)]
    assert series["shardwise_job_samples_per_second"] == []
