"""Unit tests of the pure straggler / memory-balance analysis on synthetic windows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import pytest
from analysis_driver import SETTINGS, Run, ever_flagged, first_flagged

from shardwise.metrics.analysis import (
    MAX_NAMED,
    AnalysisSettings,
    JobAnalysis,
    JobWindows,
    PlanView,
    RankSample,
    StagePrediction,
    TrainerMetricsError,
    analyse,
    ingest,
    keep_ranks,
    memory_condition,
    observe_pass,
    parse_page,
    parse_trainer_metrics,
    plan_from_layout,
    straggler_condition,
)
from shardwise.metrics.synthetic import GIB, SyntheticJob, uniform_plan
from shardwise_trainer import metrics as trainer_metrics

# --------------------------------------------------------------------------- stragglers


@pytest.mark.parametrize(
    ("plan", "stage_cost"),
    [
        (uniform_plan(dp=8), ()),
        (uniform_plan(tp=2, pp=2, dp=2), ()),
        (uniform_plan(tp=1, pp=4, dp=4), (1.3, 1.0, 1.0, 1.6)),
    ],
    ids=["dp8", "tp2-pp2-dp2", "pp4-uneven-stages"],
)
def test_uniform_ranks_never_flagged_over_1000_windows(plan: PlanView, stage_cost: Sequence[float]) -> None:
    run = Run(SyntheticJob("ns", "j", plan, stage_cost=stage_cost, noise=0.03), seed=7)
    for _ in range(1000):
        run.window()
    assert ever_flagged(run) == set()
    assert run.last is not None
    scores = [r.score for r in run.last.stragglers.ranks]
    assert all(s is not None and abs(s - 1) < 0.1 for s in scores)
    assert straggler_condition(run.last.stragglers).reason == "NoStragglers"


@pytest.mark.parametrize(
    ("plan", "slow_rank"),
    [
        (uniform_plan(dp=8), 5),
        (uniform_plan(tp=2, pp=2, dp=2), 6),  # stage 1
        (uniform_plan(tp=1, pp=4, dp=2), 3),  # two ranks per stage: leave-one-out median
        (uniform_plan(tp=4, pp=1, dp=16), 63),
    ],
    ids=["dp8", "tp2-pp2-dp2", "pp4-dp2", "64-ranks"],
)
def test_one_rank_25_percent_slower_is_flagged_within_3_windows(plan: PlanView, slow_rank: int) -> None:
    run = Run(SyntheticJob("ns", "j", plan, slow={slow_rank: 1.25}), seed=3)
    assert run.tumbling() == frozenset()
    assert run.tumbling() == frozenset()
    assert run.tumbling() == {slow_rank}
    assert run.last is not None
    timing = next(r for r in run.last.stragglers.ranks if r.identity.rank == slow_rank)
    assert timing.score == pytest.approx(1.25, rel=0.03)
    assert timing.identity.stage == plan.stage_of(slow_rank)


def test_slow_rank_from_the_start_flagged_k_passes_after_enough_samples() -> None:
    """Sliding mode (one new step per pass, as the scrape loop runs): evaluated from the 3rd pass."""
    run = Run(SyntheticJob("ns", "j", uniform_plan(dp=8), slow={2: 1.25}))
    for _ in range(10):
        run.window()
    k, first_evaluated = SETTINGS.consecutive_windows, SETTINGS.min_samples
    assert first_flagged(run, 2) == first_evaluated + k - 1
    assert ever_flagged(run) == {2}


@pytest.mark.parametrize("factor", [2.0, 5.0, 50.0])
@pytest.mark.parametrize("when", ["first-step", "steady-state"])
def test_a_single_slow_step_is_not_flagged(factor: float, when: str) -> None:
    run = Run(SyntheticJob("ns", "j", uniform_plan(dp=8)), seed=11)
    if when == "steady-state":
        for _ in range(20):
            run.window()
    run.window(outlier={4: factor})
    for _ in range(30):
        run.window()
    assert ever_flagged(run) == set()


def test_two_slow_steps_in_a_row_are_still_not_flagged() -> None:
    """A median of 10 needs a majority of slow steps: a short burst is absorbed."""
    run = Run(SyntheticJob("ns", "j", uniform_plan(dp=8)), seed=5)
    for _ in range(12):
        run.window()
    run.window(outlier={1: 3.0})
    run.window(outlier={1: 3.0})
    for _ in range(12):
        run.window()
    assert ever_flagged(run) == set()


def test_stages_are_compared_with_themselves_only() -> None:
    """Stage 3 is 60 % slower by design (loss head): no straggler; a slow rank inside stage 1 is."""
    plan = uniform_plan(tp=2, pp=4, dp=2)
    costs = (1.2, 1.0, 1.0, 1.6)
    run = Run(SyntheticJob("ns", "j", plan, stage_cost=costs), seed=2)
    for _ in range(30):
        run.tumbling()
    assert ever_flagged(run) == set()
    assert run.last is not None
    stage3 = [r for r in run.last.stragglers.ranks if r.identity.stage == 3]
    assert all(r.score == pytest.approx(1.0, abs=0.05) for r in stage3)
    assert all(r.step_seconds == pytest.approx(1.6, rel=0.05) for r in stage3)
    slow = plan.dp * plan.tp * 1 + 1  # a rank of stage 1
    for _ in range(3):
        run.tumbling(slow={slow: 1.3})
    assert run.flagged[-1] == {slow}


@pytest.mark.parametrize(
    ("phases", "expected"),
    [
        # (factor of rank 0 in each tumbling window) -> flagged after each window
        ([1.25] * 3 + [1.0] * 3, [0, 0, 1, 1, 1, 0]),
        # inside the hysteresis band (1.1 .. 1.2) the verdict holds, whichever it is
        ([1.25] * 3 + [1.15] * 5 + [1.0] * 3, [0, 0, 1] + [1] * 5 + [1, 1, 0]),
        ([1.15] * 8, [0] * 8),
        # an interruption restarts the count, both ways
        ([1.25, 1.25, 1.0, 1.25, 1.25, 1.25], [0, 0, 0, 0, 0, 1]),
        ([1.25] * 3 + [1.0, 1.0, 1.25, 1.0, 1.0, 1.0], [0, 0, 1, 1, 1, 1, 1, 1, 0]),
    ],
    ids=[
        "clears-after-k",
        "band-holds-flag",
        "band-never-flags",
        "slow-streak-resets",
        "clear-streak-resets",
    ],
)
def test_hysteresis(phases: list[float], expected: list[int]) -> None:
    run = Run(SyntheticJob("ns", "j", uniform_plan(dp=4), noise=0.01), seed=1)
    got = [int(0 in run.tumbling(slow={0: factor})) for factor in phases]
    assert got == expected


def test_passes_without_new_steps_do_not_advance_the_count() -> None:
    settings = SETTINGS
    job = SyntheticJob("ns", "j", uniform_plan(dp=4), slow={1: 1.5}, noise=0.0)
    state = JobWindows()
    for step in range(3):
        state = ingest(state, job.samples(step), settings)
    for _ in range(10):  # scraped again and again, the trainer did not step
        state = ingest(state, job.samples(2), settings)
        state, result = analyse(state, job.plan, settings)
    assert result.stragglers.findings == ()
    assert state.tracks[1].slow_windows == 1


def test_window_is_bounded_and_deduplicates_steps() -> None:
    settings = AnalysisSettings(window_size=5, min_samples=2)
    job = SyntheticJob("ns", "j", uniform_plan(dp=2))
    state = JobWindows()
    for step in range(100):
        state = ingest(state, job.samples(step), settings)
        state = ingest(state, job.samples(step), settings)
    assert [s.step for s in state.windows[0].samples] == [95, 96, 97, 98, 99]
    assert state.windows[0].new_samples == 100
    state, _ = analyse(state, job.plan, settings)
    assert state.windows[0].new_samples == 0
    assert set(keep_ranks(state, [0]).windows) == {0}


def test_stage_of_one_rank_and_too_few_samples_mean_insufficient_data() -> None:
    """On the step signal a stage of one rank has no peer (on compute it is compared by share)."""
    step_only = AnalysisSettings(straggler_signal="Step")
    run = Run(SyntheticJob("ns", "j", uniform_plan(pp=4, dp=1)), settings=step_only)
    for _ in range(5):
        run.window()
    assert run.last is not None
    assert all(r.score is None for r in run.last.stragglers.ranks)
    cond = straggler_condition(run.last.stragglers)
    assert (cond.status, cond.reason) == (False, "InsufficientData")
    assert "no pipeline stage has two ranks" in cond.message

    early = Run(SyntheticJob("ns", "j", uniform_plan(dp=8)))
    early.window()
    assert early.last is not None
    cond = straggler_condition(early.last.stragglers)
    assert (cond.status, cond.reason) == (False, "InsufficientData")
    assert "8 of 8 ranks have fewer step-time samples than needed" in cond.message


def test_job_throughput_sums_replicas_at_their_slowest_rank() -> None:
    plan = uniform_plan(tp=2, pp=2, dp=2)  # replicas: dp_rank 0 = ranks 0,1,4,5; 1 = 2,3,6,7
    job = SyntheticJob("ns", "j", plan, slow={5: 2.0}, noise=0.0, tokens_per_step=1000.0, sync="none")
    state = JobWindows()
    for step in range(3):
        state = ingest(state, job.samples(step), SETTINGS)
    _, result = analyse(state, plan, SETTINGS)
    assert result.tokens_per_second == pytest.approx(500.0 + 1000.0)


# --------------------------------------------------------------------------- memory balance


def mem_sample(
    rank: int, used_gib: float, *, stage: int | None = None, kind: str = "peak_reserved"
) -> RankSample:
    return RankSample(
        rank=rank,
        pod=f"j-node-{rank // 4}",
        node=f"n{rank // 4}",
        gpu=str(rank % 4),
        local_rank=rank % 4,
        stage=stage,
        step=1,
        step_seconds=1.0,
        memory_bytes=((kind, used_gib * GIB),),
    )


def balance_of(used_gib: Sequence[float], plan: PlanView | None, threshold: float = 0.1) -> JobAnalysis:
    settings = AnalysisSettings(memory_imbalance_threshold=threshold)
    state = ingest(JobWindows(), [mem_sample(r, u) for r, u in enumerate(used_gib)], settings)
    return analyse(state, plan, settings)[1]


def plan_of(pp: int, dp: int, predicted_gib: Sequence[float], capacity_gib: float = 80) -> PlanView:
    return PlanView(
        tp=1,
        pp=pp,
        dp=dp,
        capacity_bytes=int(capacity_gib * GIB),
        per_stage=tuple(
            StagePrediction(s, int(g * GIB), int(g * GIB) // 2) for s, g in enumerate(predicted_gib)
        ),
    )


@pytest.mark.parametrize(
    ("used", "plan", "stages", "job"),
    [
        # one stage: [10, 10, 10, 14] GiB: mean 11, max/mean 14/11, spread 4/14, cv sqrt(3)/11
        (
            [10, 10, 10, 14],
            plan_of(1, 4, [12]),
            [(14 / 11, 4 / 14, math.sqrt(3) / 11)],
            (14 / 11, math.sqrt(3) / 11),
        ),
        # two stages of two: stage 0 [8, 12] (mean 10: 1.2, 1/3, 0.2), stage 1 [20, 20] (1, 0, 0);
        # job [8, 12, 20, 20]: mean 15, max/mean 4/3, deviations -7 -3 5 5 -> variance 27
        (
            [8, 12, 20, 20],
            plan_of(2, 2, [10, 20]),
            [(1.2, 4 / 12, 0.2), (1.0, 0.0, 0.0)],
            (20 / 15, math.sqrt(27) / 15),
        ),
        # no plan: every rank in stage 0 (their own label absent)
        ([16, 16], None, [(1.0, 0.0, 0.0)], (1.0, 0.0)),
    ],
    ids=["one-stage", "two-stages", "no-plan"],
)
def test_imbalance_arithmetic(
    used: list[float],
    plan: PlanView | None,
    stages: list[tuple[float, float, float]],
    job: tuple[float, float],
) -> None:
    mem = balance_of(used, plan).memory
    assert [(s.ratio, s.spread, s.cv) for s in mem.stages] == stages
    assert mem.job is not None
    assert (mem.job.ratio, mem.job.cv) == job
    assert mem.job.max_bytes == max(used) * GIB
    assert mem.job.min_bytes == min(used) * GIB


def test_prediction_error_headroom_and_findings_name_the_gpus() -> None:
    plan = plan_of(2, 2, [10, 20], capacity_gib=24)
    mem = balance_of([8, 12, 20, 22], plan).memory
    by_rank = {g.identity.rank: g for g in mem.gpus}
    assert by_rank[1].predicted_bytes == 10 * GIB
    assert by_rank[1].prediction_error_ratio == 0.2  # (12 - 10) / 10
    assert by_rank[0].prediction_error_ratio == -0.2
    assert by_rank[3].prediction_error_ratio == 0.1  # stage 1: (22 - 20) / 20
    assert by_rank[3].headroom_bytes == 2 * GIB
    assert by_rank[3].headroom_ratio == 2 / 24
    assert by_rank[3].capacity_bytes == 24 * GIB
    assert by_rank[2].predicted_model_state_bytes == 10 * GIB
    # stage 0 spread 4/12 > 0.1; stage 1 spread 2/22 < 0.1; across stages is not a finding
    assert [f.stage for f in mem.findings] == [0]
    finding = mem.findings[0]
    assert (finding.heaviest.rank, finding.heaviest.pod, finding.heaviest.node, finding.heaviest.gpu) == (
        1,
        "j-node-0",
        "n0",
        "1",
    )
    assert finding.lightest.rank == 0


def test_used_memory_kind_preference_and_measured_capacity() -> None:
    sample = RankSample(
        rank=0,
        memory_bytes=(
            ("device_total", 24.0 * GIB),
            ("peak_allocated", 5.0 * GIB),
            ("peak_reserved", 6.0 * GIB),
        ),
    )
    assert sample.used_bytes == 6 * GIB
    assert sample.capacity_bytes == 24 * GIB
    assert RankSample(rank=0, memory_bytes=(("peak_rss", 1.0), ("rss", 0.5))).used_bytes == 1.0
    state = ingest(JobWindows(), [sample], SETTINGS)
    gpu = analyse(state, plan_of(1, 1, [5], capacity_gib=80), SETTINGS)[1].memory.gpus[0]
    assert gpu.capacity_bytes == 24 * GIB  # the device's own figure beats the plan's


def test_peak_over_the_window_is_used() -> None:
    state = JobWindows()
    for step, used in enumerate([5, 9, 7]):
        state = ingest(state, [replace(mem_sample(0, used), step=step)], SETTINGS)
    assert analyse(state, None, SETTINGS)[1].memory.gpus[0].used_bytes == 9 * GIB


# --------------------------------------------------------------------------- conditions


def test_straggler_condition_names_rank_pod_node_gpu() -> None:
    run = Run(SyntheticJob("ns", "train", uniform_plan(dp=16), slow={11: 1.25, 3: 1.4}))
    for _ in range(3):
        run.tumbling()
    assert run.last is not None
    cond = straggler_condition(run.last.stragglers)
    assert (cond.type, cond.status, cond.reason) == ("StragglerDetected", True, "StragglerFound")
    assert cond.message.startswith(
        "2 straggler(s) on node(s) gpu-node-0, gpu-node-1: rank 3 (pod train-node-0,"
    )
    assert "rank 11 (pod train-node-1, node gpu-node-1, GPU 3, stage 0)" in cond.message
    assert "1.4" in cond.message and "x its stage's" in cond.message


def test_straggler_condition_caps_the_names() -> None:
    n = MAX_NAMED + 3
    slow = {r: 1.5 for r in range(n)}
    run = Run(SyntheticJob("ns", "j", uniform_plan(dp=64), slow=slow, noise=0.0))
    for _ in range(3):
        run.tumbling()
    assert run.last is not None
    cond = straggler_condition(run.last.stragglers)
    assert cond.message.count("rank ") == MAX_NAMED
    assert "; and 3 more" in cond.message


@pytest.mark.parametrize(
    ("used", "status", "reason", "fragments"),
    [
        (
            [8, 12, 20, 20],
            True,
            "MemoryImbalanced",
            [
                "within 1 pipeline stage(s): stage 0: spread 33.3 % (max/mean 1.20)",
                "rank 1 (pod j-node-0, node n0, GPU 1, stage 0) peaks at 12.00 GiB",
                "rank 0 (pod j-node-0, node n0, GPU 0, stage 0) at 8.00 GiB",
            ],
        ),
        ([10, 10.5, 20, 20], False, "MemoryBalanced", ["within 10.0 % in every pipeline stage", "stage 0"]),
    ],
)
def test_memory_condition(used: list[float], status: bool, reason: str, fragments: list[str]) -> None:
    cond = memory_condition(balance_of(used, plan_of(2, 2, [10, 20])).memory)
    assert (cond.type, cond.status, cond.reason) == ("MemoryImbalanced", status, reason)
    for fragment in fragments:
        assert fragment in cond.message


def test_memory_condition_insufficient_data() -> None:
    cond = memory_condition(balance_of([10], None).memory)
    assert (cond.status, cond.reason) == (False, "InsufficientData")
    empty = analyse(JobWindows(), None, SETTINGS)[1]
    assert memory_condition(empty.memory).reason == "InsufficientData"
    assert (
        straggler_condition(empty.stragglers).message == "Cannot judge: no rank has reported step times yet."
    )


# --------------------------------------------------------------------------- parsing and plan


def trainer_stats(rank: int, **extra: object) -> dict[str, object]:
    return {
        "labels": {
            "namespace": "ns",
            "job": "train",
            "pod": "train-node-0",
            "node": "n0",
            "rank": str(rank),
            "local_rank": str(rank),
            "gpu": str(rank),
            "stage": "0",
        },
        "step": 12,
        "step_seconds": 0.5 + rank,
        "wait_seconds": 0.01,
        "tokens_per_second": 4096.0,
        "loss": float("nan"),
        "memory_bytes": {"peak_reserved": 3 * GIB, "device_total": 24 * GIB},
        "model_state_bytes": 2 * GIB,
        "predicted_model_state_bytes": 2 * GIB,
        "last_update_timestamp_seconds": 1_700_000_000.5,
        **extra,
    }


def test_parses_the_trainers_real_exposition() -> None:
    text = trainer_metrics.render([trainer_stats(1), trainer_stats(0)])
    samples = parse_trainer_metrics(text)
    assert [s.rank for s in samples] == [0, 1]
    s = samples[1]
    assert (s.namespace, s.job, s.pod, s.node, s.gpu, s.local_rank, s.stage) == (
        "ns",
        "train",
        "train-node-0",
        "n0",
        "1",
        1,
        0,
    )
    assert (s.step, s.step_seconds, s.wait_seconds, s.tokens_per_second) == (12, 1.5, 0.01, 4096.0)
    assert (s.compute_seconds, s.communication_seconds) == (None, None)  # an older trainer: absent
    s = parse_trainer_metrics(
        trainer_metrics.render([trainer_stats(0, compute_seconds=0.4, communication_seconds=0.1)])
    )[0]
    assert (s.compute_seconds, s.communication_seconds) == (0.4, 0.1)
    assert s.used_bytes == 3 * GIB and s.capacity_bytes == 24 * GIB
    assert s.model_state_bytes == 2 * GIB and s.predicted_model_state_bytes == 2 * GIB
    assert s.timestamp == 1_700_000_000.5


def test_parse_ignores_foreign_series_and_rejects_garbage() -> None:
    text = (
        "# TYPE other gauge\nother 1\n"
        "# TYPE shardwise_trainer_step_seconds gauge\n"
        'shardwise_trainer_step_seconds{rank="x"} 2\n'
        'shardwise_trainer_step_seconds{rank="3",pod="p"} 2\n'
    )
    (only,) = parse_trainer_metrics(text)
    assert (only.rank, only.pod, only.step_seconds, only.step) == (3, "p", 2.0, None)
    assert parse_trainer_metrics("") == ()
    with pytest.raises(TrainerMetricsError):
        parse_trainer_metrics("<html>502 Bad Gateway</html>\n")


@pytest.mark.parametrize(
    ("series", "world_size", "ranks", "rejected"),
    [
        ('{rank="0",pod="p"} 1', 4, [0], {}),
        ('{rank="-3",pod="p"} 1', 4, [], {"rank_out_of_range": 1}),
        ('{rank="-3",pod="p"} 1', None, [], {"rank_out_of_range": 1}),  # negative, whatever the size
        ('{rank="4",pod="p"} 1', 4, [], {"rank_out_of_range": 1}),  # past the world size
        ('{rank="4",pod="p"} 1', None, [4], {}),  # world size unknown: only negatives go
        ('{rank="x"} 1', 4, [], {"rank_out_of_range": 1}),
        ('{rank="1",pod="p",series="7"} 1', 4, [], {"unknown_labels": 1}),  # a label the trainer never sets
        ('{pod="p"} 1', 4, [], {}),  # not a per-rank series: ignored, as foreign series are
    ],
    ids=["valid", "negative", "negative-unknown-size", "too-large", "unknown-size", "not-a-number",
         "foreign-label", "no-rank"],
)  # fmt: skip
def test_parse_page_rejects_ranks_outside_the_world_and_foreign_label_sets(
    series: str, world_size: int | None, ranks: list[int], rejected: dict[str, int]
) -> None:
    text = f"# TYPE shardwise_trainer_step_seconds gauge\nshardwise_trainer_step_seconds{series}\n"
    page = parse_page(text, world_size)
    assert [s.rank for s in page.samples] == ranks
    assert dict(page.rejected) == rejected


def test_bogus_series_create_no_windows_and_count_as_a_failed_page() -> None:
    plan = uniform_plan(dp=2)
    bogus = "".join(f'shardwise_trainer_step_seconds{{rank="-{i}"}} 1\n' for i in range(1, 1001))
    good = 'shardwise_trainer_step_seconds{rank="1",pod="p"} 1\n'
    outcome = observe_pass(JobWindows(), {"p": bogus + good}, plan, SETTINGS)
    assert sorted(outcome.state.windows) == [1]
    assert outcome.failed_pods == ("p",)
    assert outcome.rejected == (("p", "rank_out_of_range", 1000),)
    # Without a plan the job's world size (status.layout.gpus) bounds the ranks instead.
    page = "".join(f'shardwise_trainer_step_seconds{{rank="{i}"}} 1\n' for i in range(100))
    outcome = observe_pass(JobWindows(), {"p": page}, None, SETTINGS, world_size=8)
    assert sorted(outcome.state.windows) == list(range(8))
    assert outcome.rejected == (("p", "rank_out_of_range", 92),)


def test_plan_from_layout_maps_ranks_to_stages_in_contract_order() -> None:
    layout = {
        "layout": {"tp": 2, "pp": 2, "dp": 3, "zero_stage": 1},
        "ranks": {"order": ["pp", "dp", "tp"]},
        "predicted": {
            "gpu_memory_bytes": 80 * GIB,
            "per_stage": [
                {"stage": 0, "total": 30 * GIB, "model_state_bytes": 10 * GIB},
                {"stage": 1, "total": 25 * GIB, "model_state_bytes": 9 * GIB},
            ],
        },
    }
    plan = plan_from_layout(layout)
    assert plan.world_size == 12
    assert [plan.stage_of(r) for r in range(12)] == [0] * 6 + [1] * 6
    assert [plan.replica_of(r) for r in range(6)] == [0, 0, 1, 1, 2, 2]
    assert plan.prediction(1) == StagePrediction(1, 25 * GIB, 9 * GIB)
    assert plan.capacity_bytes == 80 * GIB


def test_settings_from_monitoring_and_validation() -> None:
    s = AnalysisSettings.from_monitoring({"stragglerThreshold": 0.3, "memoryImbalanceThreshold": 0.05})
    assert (s.straggler_threshold, s.memory_imbalance_threshold, s.consecutive_windows) == (0.3, 0.05, 3)
    assert AnalysisSettings.from_monitoring(None) == AnalysisSettings()
    with pytest.raises(ValueError, match="min_samples"):
        AnalysisSettings(window_size=2, min_samples=3)


# --------------------------------------------------------------------------- one scrape pass


def pod_pages(job: SyntheticJob, step: int) -> dict[str, str]:
    """Each pod's stats page, rendered by the trainer's own code from synthetic samples."""
    pages: dict[str, list[dict[str, object]]] = {}
    for s in job.samples(step):
        stats = trainer_stats(
            s.rank,
            step=s.step,
            step_seconds=s.step_seconds,
            compute_seconds=s.compute_seconds,
            communication_seconds=s.communication_seconds,
        )
        stats["labels"] = {
            "namespace": s.namespace,
            "job": s.job,
            "pod": s.pod,
            "node": s.node,
            "rank": str(s.rank),
            "local_rank": str(s.local_rank),
            "gpu": s.gpu,
            "stage": str(s.stage),
        }
        stats["last_update_timestamp_seconds"] = s.timestamp
        pages.setdefault(s.pod, []).append(stats)
    return {pod: trainer_metrics.render(stats) for pod, stats in pages.items()}


def test_observe_pass_end_to_end_through_the_trainers_text() -> None:
    plan = uniform_plan(tp=2, pp=2, dp=4)  # 16 ranks on 2 pods
    job = SyntheticJob("ns", "train", plan, slow={9: 1.3}, noise=0.0)
    state = JobWindows()
    for step in range(5):
        outcome = observe_pass(state, pod_pages(job, step), plan, SETTINGS)
        state = outcome.state
    assert outcome.failed_pods == () and outcome.errors == ()
    assert [r.identity.rank for r in outcome.analysis.stragglers.findings] == [9]
    assert outcome.straggler.status and "rank 9 (pod train-node-1, node gpu-node-1, GPU 1, stage 1)" in (
        outcome.straggler.message
    )
    assert (outcome.memory.status, outcome.memory.reason) == (False, "MemoryBalanced")
    assert [c.type for c in outcome.conditions] == ["StragglerDetected", "MemoryImbalanced"]


def test_observe_pass_reports_failed_pods_and_keeps_going() -> None:
    plan = uniform_plan(dp=16)
    job = SyntheticJob("ns", "train", plan)
    pages: dict[str, str | BaseException | None] = dict(pod_pages(job, 1))
    pages["train-node-1"] = TimeoutError("timed out")
    pages["train-node-2"] = None
    pages["train-node-3"] = "<html>oops</html>"
    outcome = observe_pass(JobWindows(), pages, plan, SETTINGS)
    assert outcome.failed_pods == ("train-node-1", "train-node-2", "train-node-3")
    assert outcome.errors[0] == "train-node-1: timed out"
    assert outcome.errors[1] == "train-node-2: no answer"
    assert sorted(outcome.state.windows) == list(range(8))  # node 0's ranks


def test_ranks_outside_the_plan_are_dropped() -> None:
    big = SyntheticJob("ns", "j", uniform_plan(dp=8))
    state = ingest(JobWindows(), big.samples(1), SETTINGS)
    state, result = analyse(state, uniform_plan(dp=4), SETTINGS)
    assert sorted(state.windows) == [0, 1, 2, 3]
    assert len(result.memory.gpus) == 4
