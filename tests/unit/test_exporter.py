"""The job-metrics exporter: promtool-clean, identical in both renderings, no series left behind."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shardwise.metrics.analysis import AnalysisSettings, JobWindows, analyse, ingest
from shardwise.metrics.exporter import (
    EXPOSED_NAMES,
    FAMILIES,
    JobMetricsExporter,
    exposition,
)
from shardwise.metrics.operator_metrics import OperatorMetrics
from shardwise.metrics.synthetic import GIB, SyntheticJob, uniform_plan

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = AnalysisSettings()


def feed(exporter: JobMetricsExporter, job: SyntheticJob, passes: int = 6, seed: int = 0) -> None:
    rng = random.Random(seed)
    state = JobWindows()
    for step in range(passes):
        state = ingest(state, job.samples(step, rng), SETTINGS)
        state, result = analyse(state, job.plan, SETTINGS)
    exporter.update_job(job.namespace, job.job, result)


#: A status.progress with every figure (tests/unit/test_progress.py derives one).
PROGRESS = {
    "step": 40,
    "totalSteps": 100,
    "percent": 40,
    "remainingSeconds": 120,
    "eta": "2026-01-01T00:00:00Z",
    "tokensPerSecond": 2048.0,
    "samplesPerSecond": 8.0,
    "mfu": 0.31,
    "plannedMfu": 0.4,
    "predictedStepSeconds": 1.5,
    "measuredStepSeconds": 2.0,
    "loss": 2.1,
    "smoothedLoss": 2.3,
    "validationLoss": 2.4,
    "lastUpdateTime": "2025-12-31T23:58:00Z",
}


def realistic(exporter: JobMetricsExporter, jobs: int = 3) -> None:
    """A few jobs of different shapes, one straggler, one imbalanced GPU, errors and restarts."""
    shapes = [uniform_plan(dp=8), uniform_plan(tp=2, pp=2, dp=2), uniform_plan(tp=4, pp=2, dp=2)]
    for i in range(jobs):
        job = SyntheticJob(
            f"team-{i % 2}",
            f"train-{i}",
            shapes[i % len(shapes)],
            slow={1: 1.3},
            memory_offset_bytes={2: 3 * GIB},
        )
        feed(exporter, job, passes=6, seed=i)
        exporter.observe_status(job.namespace, job.job, {"phase": "Running", "restarts": i})
        exporter.update_progress(job.namespace, job.job, PROGRESS, deadline=1_800_000_000.0)
    exporter.record_scrape_error("team-0", "train-0", "train-0-node-0")
    exporter.record_scrape_error("team-0", "train-0", "train-0-node-0", 2)


def operator_metrics() -> OperatorMetrics:
    om = OperatorMetrics()
    om.observe_job(
        ("team-0", "train-0"),
        {"phase": "Running", "layout": {"tensor": 1, "pipeline": 1, "data": 8, "zeroStage": 1}},
    )
    om.reconcile_seconds.observe(0.02)
    return om


def series(text: bytes) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    ]


def test_fast_render_is_byte_identical_to_generate_latest() -> None:
    exporter = JobMetricsExporter()
    realistic(exporter)
    # a label value that needs every escape (label values come from pods: never trust them)
    odd = SyntheticJob("team-0", 'odd"job\\x\nz', uniform_plan(dp=2))
    feed(exporter, odd)
    registry = CollectorRegistry()
    registry.register(exporter)
    assert exporter.render() == generate_latest(registry)


def test_empty_render_matches_too_and_has_every_family() -> None:
    exporter = JobMetricsExporter()
    text = exporter.render()
    registry = CollectorRegistry()
    registry.register(exporter)
    assert text == generate_latest(registry)
    names = re.findall(r"^# TYPE (\S+) ", text.decode(), re.M)
    assert tuple(names) == EXPOSED_NAMES


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) not installed")
def test_promtool_check_metrics_passes_on_a_real_render() -> None:
    exporter = JobMetricsExporter()
    realistic(exporter, jobs=6)
    body = exposition(operator_metrics().registry, exporter)
    assert b"shardwise_gpu_memory_used_bytes{" in body and b"shardwise_job_layout_info{" in body
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert done.stdout.decode().strip() == "" and done.stderr.decode().strip() == ""


def test_per_gpu_and_per_rank_series_carry_bounded_labels() -> None:
    exporter = JobMetricsExporter()
    job = SyntheticJob("ns", "j", uniform_plan(tp=2, pp=2, dp=2), slow={6: 1.5})
    feed(exporter, job)
    got = series(exporter.render())
    used = [labels for name, labels, _ in got if name == "shardwise_gpu_memory_used_bytes"]
    assert len(used) == 8
    assert set(used[0]) == {"namespace", "job", "rank", "pod", "node", "gpu", "stage"}
    assert {(u["rank"], u["stage"]) for u in used} == {(str(r), str(r // 4)) for r in range(8)}
    values = {(n, lab.get("rank")): v for n, lab, v in got}
    assert values[("shardwise_gpu_memory_capacity_bytes", "0")] == 80 * GIB
    assert values[("shardwise_gpu_memory_predicted_bytes", "0")] == 20 * GIB
    assert values[("shardwise_gpu_memory_prediction_error_ratio", "0")] == 0.0
    assert values[("shardwise_rank_straggler", "6")] == 1.0
    assert values[("shardwise_rank_straggler", "5")] == 0.0
    assert values[("shardwise_rank_straggler_score", "6")] == pytest.approx(1.5, rel=0.05)
    assert values[("shardwise_job_stragglers", None)] == 1.0
    per_job = [n for n, lab, _ in got if set(lab) <= {"namespace", "job", "stage", "pod"}]
    assert len(per_job) <= 12  # job + per-stage series: a handful, not per rank
    assert len(got) == 8 * 13 + len(per_job)  # 6 per-GPU + 7 per-rank gauges per rank


def test_scrape_errors_counter_and_restarts() -> None:
    exporter = JobMetricsExporter()
    exporter.record_scrape_error("ns", "j", "j-node-1")
    exporter.record_scrape_error("ns", "j", "j-node-1", 4)
    exporter.observe_status("ns", "j", {"phase": "Failed", "restarts": 2})
    got = series(exporter.render())
    assert ("shardwise_scrape_errors_total", {"namespace": "ns", "job": "j", "pod": "j-node-1"}, 5.0) in got
    assert ("shardwise_job_restarts", {"namespace": "ns", "job": "j"}, 2.0) in got
    assert ("shardwise_job_phase", {"namespace": "ns", "job": "j", "phase": "Failed"}, 1.0) in got
    exporter.observe_status("ns", "j", {"phase": "Running"})
    got = series(exporter.render())
    assert [lab["phase"] for n, lab, _ in got if n == "shardwise_job_phase"] == ["Running"]
    assert not [n for n, _, _ in got if n == "shardwise_job_restarts"]


def test_ranks_that_leave_a_job_leave_no_series() -> None:
    exporter = JobMetricsExporter()
    feed(exporter, SyntheticJob("ns", "j", uniform_plan(dp=8)))
    feed(exporter, SyntheticJob("ns", "j", uniform_plan(dp=4)))  # re-planned onto 4 GPUs
    ranks = {lab["rank"] for n, lab, _ in series(exporter.render()) if "rank" in lab}
    assert ranks == {"0", "1", "2", "3"}


def test_a_finished_job_keeps_only_its_status_series() -> None:
    exporter = JobMetricsExporter()
    feed(exporter, SyntheticJob("ns", "j", uniform_plan(dp=8)))
    exporter.observe_status("ns", "j", {"phase": "Succeeded", "restarts": 1})
    exporter.record_scrape_error("ns", "j", "j-node-0")
    exporter.clear_analysis("ns", "j")
    exporter.clear_analysis("ns", "unknown")
    names = {n for n, _, _ in series(exporter.render())}
    assert names == {"shardwise_job_phase", "shardwise_job_restarts", "shardwise_scrape_errors_total"}


def test_nothing_leaks_over_1000_jobs() -> None:
    exporter = JobMetricsExporter()
    empty = exporter.render()
    job = SyntheticJob("ns", "x", uniform_plan(dp=2), noise=0.0)
    state = JobWindows()
    for step in range(3):
        state = ingest(state, job.samples(step), SETTINGS)
    _, result = analyse(state, job.plan, SETTINGS)
    for i in range(1000):
        exporter.update_job("ns", f"job-{i}", result)
        exporter.record_scrape_error("ns", f"job-{i}", f"job-{i}-node-0")
        exporter.observe_status("ns", f"job-{i}", {"phase": "Running", "restarts": 1})
        if i >= 10:
            exporter.forget_job("ns", f"job-{i - 10}")
    assert len(exporter.jobs()) == 10
    assert len({lab["job"] for _, lab, _ in series(exporter.render())}) == 10
    for i in range(990, 1000):
        exporter.forget_job("ns", f"job-{i}")
    assert exporter.jobs() == []
    assert exporter.render() == empty
    registry = CollectorRegistry()
    registry.register(exporter)
    assert generate_latest(registry) == empty


def test_registering_twice_is_refused_by_name() -> None:
    registry = CollectorRegistry()
    JobMetricsExporter(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        JobMetricsExporter(registry)


def test_no_clash_with_the_operators_own_metrics() -> None:
    om = OperatorMetrics()
    JobMetricsExporter(om.registry)  # registration checks every name against the registry's


def test_every_exported_metric_is_documented() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    missing = [name for name in EXPOSED_NAMES if f"`{name}`" not in doc]
    assert missing == []
    for name, mtype, _, labels in FAMILIES:
        assert re.fullmatch(r"shardwise_[a-z_]+", name)
        assert mtype in ("gauge", "counter")
        assert len(labels) <= 7
