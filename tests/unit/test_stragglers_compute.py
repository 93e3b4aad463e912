"""Straggler detection on compute time, where wall step times even out (synchronous collectives).

Noise model of every run here (``REALISTIC``): per rank and step a multiplicative Gaussian
noise of 3 % on compute, a fixed per-rank bias of 1 % (GPUs of one model differ), spikes on 2 %
of the rank-steps multiplying that step's compute by U(1.2, 3) (GC pauses, a data-loader
hiccup), and a collective that adds 10 % of the slowest compute of its group; every rank of a
group (a pipeline stage, or the whole job for pipelines) ends its step together. Detection
rates over many seeds and noisier models: benchmarks/stragglers.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest
from analysis_driver import Run

from shardwise.metrics.analysis import (
    AnalysisSettings,
    PlanView,
    analyse,
    ingest,
    straggler_condition,
)
from shardwise.metrics.stragglers import BASIS_STAGE, BASIS_STAGES
from shardwise.metrics.synthetic import SyntheticJob, uniform_plan

REALISTIC: dict[str, Any] = {
    "noise": 0.03,
    "rank_bias": 0.01,
    "spike_probability": 0.02,
    "spike_factor": 3.0,
    "communication_fraction": 0.1,
}


def job(plan: PlanView, *, slow: Mapping[int, float] | None = None, **kwargs: Any) -> SyntheticJob:
    sync = "job" if plan.pp > 1 else "stage"  # a pipeline's stages wait for each other too
    options = {**REALISTIC, "sync": sync, **kwargs}
    return SyntheticJob("ml", "train", plan, slow=dict(slow or {}), **options)


LAYOUTS = {
    "dp2": uniform_plan(dp=2),
    "dp8": uniform_plan(dp=8),
    "tp2": uniform_plan(tp=2, dp=1),
    "tp2-pp2": uniform_plan(tp=2, pp=2, dp=1),
    "tp2-pp2-dp2": uniform_plan(tp=2, pp=2, dp=2),
    "tp4-dp16": uniform_plan(tp=4, dp=16),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_healthy_run_never_flagged_over_1000_windows(name: str) -> None:
    """1000 analysis passes, one new step each (the scrape loop's sliding windows)."""
    run = Run(job(LAYOUTS[name]), seed=17)
    for _ in range(1000):
        run.window()
    assert set().union(*run.flagged) == set()
    assert straggler_condition(run.report).reason == "NoStragglers"
    assert all(r.signal == "Compute" and r.basis == BASIS_STAGE for r in run.report.ranks)


@pytest.mark.parametrize(
    ("name", "slow_rank"),
    [("dp2", 1), ("dp8", 5), ("tp2", 0), ("tp2-pp2", 3), ("tp2-pp2-dp2", 6), ("tp4-dp16", 63)],
)
def test_25_percent_slower_compute_flagged_within_3_windows(name: str, slow_rank: int) -> None:
    plan = LAYOUTS[name]
    run = Run(job(plan, slow={slow_rank: 1.25}), seed=3)
    for _ in range(3):
        run.tumbling()
    assert run.flagged[-1] == {slow_rank}
    assert set().union(*run.flagged) == {slow_rank}
    timing = run.timing(slow_rank)
    assert timing.score == pytest.approx(1.25, rel=0.06)
    # The slow rank's wall step time is its whole stage's: nothing to see there.
    peers = [r for r in run.report.ranks if r.identity.stage == plan.stage_of(slow_rank)]
    assert {round(r.step_seconds or 0, 9) for r in peers} == {round(timing.step_seconds or 0, 9)}


def test_step_time_signal_cannot_see_it_compute_time_can() -> None:
    """The issue's case: DP2, the slow rank's peer waits for it inside the all-reduce."""
    slow = job(LAYOUTS["dp2"], slow={1: 1.25})
    on_step = Run(slow, AnalysisSettings(straggler_signal="Step"), seed=5)
    on_compute = Run(slow, seed=5)
    for _ in range(10):
        on_step.tumbling()
        on_compute.tumbling()
    assert set().union(*on_step.flagged) == set()
    assert on_step.timing(1).score == pytest.approx(1.0)
    assert on_compute.flagged[2:] == [{1}] * 8
    assert on_compute.timing(0).communication_seconds > on_compute.timing(1).communication_seconds


def test_tp2_pp2_slow_rank_found_though_its_stage_has_one_replica() -> None:
    plan = LAYOUTS["tp2-pp2"]  # ranks 0, 1: stage 0; 2, 3: stage 1; one DP replica
    run = Run(job(plan, slow={2: 1.25}), seed=11)
    for _ in range(3):
        run.tumbling()
    assert run.flagged[-1] == {2}
    timing = run.timing(2)
    assert (timing.basis, timing.identity.stage, plan.replica_of(2)) == (BASIS_STAGE, 1, 0)
    assert timing.reference == pytest.approx(run.timing(3).value, rel=1e-9)  # its TP peer
    cond = straggler_condition(run.report)
    assert cond.status and cond.reason == "StragglerFound"
    assert "rank 2 (pod train-node-0, node gpu-node-0, GPU 2, stage 1)" in cond.message
    assert "outside collectives" in cond.message


def test_pipeline_of_single_rank_stages_compared_by_compute_share() -> None:
    plan = uniform_plan(pp=4, dp=1)  # one rank per stage: no peer inside a stage
    healthy = Run(job(plan, stage_cost=(1.2, 1.0, 1.0, 1.3)), seed=23)
    for _ in range(1000):
        healthy.window()
    assert set().union(*healthy.flagged) == set()
    assert all(r.basis == BASIS_STAGES for r in healthy.report.ranks)

    slow = Run(job(plan, slow={1: 1.6}), seed=23)
    for _ in range(3):
        slow.tumbling()
    assert slow.flagged[-1] == {1}
    timing = slow.timing(1)
    assert timing.basis == BASIS_STAGES and timing.score == pytest.approx(1.6, rel=0.08)
    cond = straggler_condition(slow.report)
    assert "rank 1 (pod train-node-0, node gpu-node-0, GPU 1, stage 1) computes" in cond.message
    assert "of the other pipeline stages" in cond.message


@pytest.mark.parametrize(
    ("phases", "expected"),
    [
        ([1.25] * 3 + [1.0] * 3, [0, 0, 1, 1, 1, 0]),
        ([1.25] * 3 + [1.15] * 4 + [1.0] * 3, [0, 0, 1] + [1] * 4 + [1, 1, 0]),
        ([1.25, 1.25, 1.0, 1.25, 1.25, 1.25], [0, 0, 0, 0, 0, 1]),
    ],
    ids=["clears-after-k", "band-holds-flag", "slow-streak-resets"],
)
def test_hysteresis_on_compute_time(phases: Sequence[float], expected: Sequence[int]) -> None:
    run = Run(job(LAYOUTS["dp8"], noise=0.01, spike_probability=0.0), seed=1)
    for factor in phases:
        run.job = replace(run.job, slow={0: factor})
        run.tumbling()
    assert [int(0 in f) for f in run.flagged] == list(expected)


def test_ranks_without_compute_times_fall_back_to_step_times() -> None:
    """An older trainer reports no compute time: its step times are compared, as before."""
    plan = uniform_plan(dp=4)
    older = job(plan, slow={2: 1.3}, sync="none")
    run = Run(older, seed=2)
    for _ in range(3):
        for _ in range(10):
            run.step += 1
            samples = [replace(s, compute_seconds=None) for s in older.samples(run.step, run.rng)]
            run.state = ingest(run.state, samples, run.settings)
        run.state, run.last = analyse(run.state, plan, run.settings)
        run.flagged.append(frozenset(r.identity.rank for r in run.last.stragglers.findings))
    assert run.flagged[-1] == {2}
    assert run.timing(2).signal == "Step"
    assert "takes" in straggler_condition(run.report).message


def test_settings_from_monitoring_read_the_straggler_knobs() -> None:
    s = AnalysisSettings.from_monitoring(
        {"stragglerSignal": "Step", "stragglerWindows": 5, "stragglerStageThreshold": 0.3}
    )
    assert (s.straggler_signal, s.consecutive_windows, s.stage_threshold) == ("Step", 5, 0.3)
    assert AnalysisSettings.from_monitoring({}, consecutive_windows=2).consecutive_windows == 2
    with pytest.raises(ValueError, match="straggler_signal"):
        AnalysisSettings(straggler_signal="Wall")
    with pytest.raises(ValueError, match="stage_threshold"):
        AnalysisSettings(stage_threshold=0)
