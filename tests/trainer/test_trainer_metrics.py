"""The per-rank stats endpoint, scraped during a real run and parsed with prometheus_client.

Also: the end-of-run JSON lines (model-state bytes, peak memory) and the test-only slow-rank
switch: rank 1's compute slowed 4x (extra work inside its forward) shows in its compute time,
while the wall step times of the two data-parallel ranks even out (rank 0 waits for rank 1
inside the gradient all-reduce).
"""

from __future__ import annotations

import statistics
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from trainer_runner import RunCache, RunResult, free_port, parse_output, torchrun_cmd, trainer_env

from shardwise.metrics.analysis import AnalysisSettings, JobWindows, analyse, ingest, parse_page
from shardwise.metrics.synthetic import uniform_plan

pytestmark = pytest.mark.trainer

LABELS = {"namespace", "job", "pod", "node", "rank", "local_rank", "gpu", "stage"}


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _medians(pages: list[str], name: str) -> dict[str, float]:
    """Per rank, the median of ``name`` over the distinct steps seen in the scraped pages."""
    by_rank: dict[str, dict[float, float]] = {}
    for text in pages:
        samples = _samples(text)
        steps = {lab["rank"]: v for lab, v in samples.get("shardwise_trainer_step", [])}
        for labels, value in samples.get(f"shardwise_trainer_{name}", []):
            by_rank.setdefault(labels["rank"], {})[steps[labels["rank"]]] = value
    return {rank: statistics.median(values.values()) for rank, values in by_rank.items()}


def _flagged_per_window(pages: list[str], settings: AnalysisSettings) -> list[tuple[frozenset[int], dict]]:
    """The pure analysis fed the scraped pages in order, one pass per tumbling window.

    A pass runs once every rank has ``window_size`` new distinct samples; returns, per pass,
    who is flagged and each rank's score.
    """
    plan = uniform_plan(dp=2)
    state = JobWindows()
    out: list[tuple[frozenset[int], dict]] = []
    for text in pages:
        state = ingest(state, parse_page(text, plan.world_size).samples, settings)
        if len(state.windows) == 2 and all(
            w.new_samples >= settings.window_size for w in state.windows.values()
        ):
            state, result = analyse(state, plan, settings)
            scores = {r.identity.rank: r.score for r in result.stragglers.ranks}
            out.append((frozenset(r.identity.rank for r in result.stragglers.findings), scores))
    return out


def test_stats_endpoint_during_run(trainer_runs: RunCache, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    env = trainer_env(
        {
            "SHARDWISE_METRICS_PORT": str(port),
            "SHARDWISE_JOB_NAME": "tiny",
            "SHARDWISE_NAMESPACE": "ml",
            "SHARDWISE_POD_NAME": "tiny-node-0",
            "SHARDWISE_NODE_NAME": "kwok-0",
            "SHARDWISE_TEST_SLOW_RANK": "1:4",
        }
    )
    # Every step refreshes the stats file, so the windows below do not depend on this CPU's step
    # time (at the default 0.5 s a fast CPU shows one step in six and fills fewer windows).
    cmd = torchrun_cmd(
        2,
        trainer_runs.layout_path("dp2-zero2"),
        40,
        "--stats-dir",
        str(tmp_path / "stats"),
        "--stats-refresh-seconds",
        "0",
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    scraped: dict[str, list[tuple[dict[str, str], float]]] = {}
    pages: list[str] = []  # every page scraped during the run, in order
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            text = _scrape(port)
            if text:
                pages.append(text)
                samples = _samples(text)
                steps = samples.get("shardwise_trainer_step", [])
                if not scraped and len(steps) == 2 and min(v for _, v in steps) >= 3:
                    scraped = samples
            time.sleep(0.1)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    assert scraped, "never scraped both ranks during the run"

    for name in (
        "shardwise_trainer_step",
        "shardwise_trainer_step_seconds",
        "shardwise_trainer_wait_seconds",
        "shardwise_trainer_compute_seconds",
        "shardwise_trainer_communication_seconds",
        "shardwise_trainer_tokens_per_second",
        "shardwise_trainer_loss",
        "shardwise_trainer_model_state_bytes",
        "shardwise_trainer_last_update_timestamp_seconds",
    ):
        assert len(scraped[name]) == 2, name
        for labels, _ in scraped[name]:
            assert set(labels) == LABELS
            assert labels["job"] == "tiny" and labels["namespace"] == "ml" and labels["pod"] == "tiny-node-0"
            assert labels["node"] == "kwok-0" and labels["gpu"] == "cpu"
    step, compute = _medians(pages, "step_seconds"), _medians(pages, "compute_seconds")
    assert compute["1"] > 2 * compute["0"], f"slowed rank 1 does not compute longer: {compute}"
    # ... while its wall step time does not tell it apart: rank 0 waits inside the all-reduce.
    assert step["1"] / step["0"] < compute["1"] / compute["0"] / 1.5, (step, compute)
    # The operator's pure analysis, fed these real pages, flags rank 1 within 3 windows (and
    # rank 0 never); on the wall step time it would see nothing to flag.
    windows = AnalysisSettings(window_size=3, min_samples=3)
    on_compute = _flagged_per_window(pages, windows)
    assert len(on_compute) >= 3, f"too few windows scraped: {len(on_compute)}"
    assert on_compute[2][0] == {1}, on_compute
    assert all(flagged <= {1} for flagged, _ in on_compute), on_compute
    on_step = _flagged_per_window(
        pages, AnalysisSettings(window_size=3, min_samples=3, straggler_signal="Step")
    )
    assert all(scores[1] < on_compute[i][1][1] for i, (_, scores) in enumerate(on_step)), (
        on_step,
        on_compute,
    )
    for labels, value in scraped["shardwise_trainer_compute_seconds"]:
        parts = {
            name: next(v for lab, v in scraped[f"shardwise_trainer_{name}"] if lab["rank"] == labels["rank"])
            for name in ("step_seconds", "communication_seconds")
        }
        assert value >= 0 and parts["communication_seconds"] >= 0
        assert value + parts["communication_seconds"] == pytest.approx(parts["step_seconds"])
    kinds = {(lab["rank"], lab["kind"]) for lab, _ in scraped["shardwise_trainer_memory_bytes"]}
    for rank in ("0", "1"):
        for kind in ("parameters", "gradients", "optimizer_states", "rss", "peak_rss"):
            assert (rank, kind) in kinds
    states = {lab["rank"]: v for lab, v in scraped["shardwise_trainer_model_state_bytes"]}
    assert states["0"] > 0 and states["0"] == states["1"]  # DP ranks hold equal ZeRO shares

    result = parse_output(out, RunResult())
    assert [r["rank"] for r in result.ranks] == [0, 1]
    for r in result.ranks:
        assert (
            r["model_state_bytes"]
            == r["parameters_bytes"] + r["gradients_bytes"] + r["optimizer_states_bytes"]
        )
        assert r["peak_memory_bytes"] > r["model_state_bytes"]
