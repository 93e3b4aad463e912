"""Metrics benchmark: the operator's /metrics with 500 jobs x 8 ranks, and the analysis per pass.

Synthetic state (shardwise.metrics.synthetic): 500 jobs of 8 GPUs in three shapes (DP8;
TP2 x PP2 x DP2; TP4 x PP2), each rank's window full (10 steps), one straggler and one heavy GPU
per job. Measures, one process (one core):

* the scrape: ``exposition(operator registry, exporter)`` (what /metrics serves), its size and
  series count; and for comparison prometheus_client's ``generate_latest`` over the exporter's
  collector (the slow path the cached text rendering replaces);
* one analysis pass over every job: ingest one new step per rank + ``analyse``; then
  ``update_job`` (re-rendering the job's text);
* parsing one pod's trainer stats page (8 ranks).

Target (issue 5): under 100 ms per scrape. Writes results/metrics.json and results/metrics.md.
Run: python benchmarks/metrics.py [--jobs 500] [--ranks 8] [--repeats 21]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from shardwise.metrics.analysis import AnalysisSettings, JobWindows, analyse, ingest, parse_trainer_metrics
from shardwise.metrics.exporter import JobMetricsExporter, exposition
from shardwise.metrics.operator_metrics import OperatorMetrics
from shardwise.metrics.synthetic import GIB, SyntheticJob, uniform_plan

TARGET_MS = 100.0
RESULTS = Path(__file__).parent / "results"


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU milliseconds of each call (CPU time excludes waiting for a shared core)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return wall, cpu


def summary(times: tuple[list[float], list[float]]) -> dict[str, float]:
    wall, cpu = sorted(times[0]), sorted(times[1])
    return {
        "median_ms": round(statistics.median(wall), 3),
        "p90_ms": round(wall[min(len(wall) - 1, int(0.9 * len(wall)))], 3),
        "max_ms": round(wall[-1], 3),
        "cpu_median_ms": round(statistics.median(cpu), 3),
        "cpu_p90_ms": round(cpu[min(len(cpu) - 1, int(0.9 * len(cpu)))], 3),
    }


def trainer_page(job: SyntheticJob, step: int) -> str:
    """One pod's stats page as the trainer renders it (trainer_image/.../metrics.py format)."""
    lines = []
    samples = job.samples(step)
    fields = [
        ("step", lambda s: s.step),
        ("step_seconds", lambda s: s.step_seconds),
        ("tokens_per_second", lambda s: s.tokens_per_second),
        ("model_state_bytes", lambda s: s.model_state_bytes),
    ]
    for name, get in fields:
        lines += [f"# HELP shardwise_trainer_{name} x", f"# TYPE shardwise_trainer_{name} gauge"]
        for s in samples:
            labels = (
                f'namespace="{s.namespace}",job="{s.job}",pod="{s.pod}",node="{s.node}",rank="{s.rank}",'
                f'local_rank="{s.local_rank}",gpu="{s.gpu}",stage="{s.stage}"'
            )
            lines.append(f"shardwise_trainer_{name}{{{labels}}} {float(get(s) or 0)!r}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--ranks", type=int, default=8, choices=[8])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    settings = AnalysisSettings()
    shapes = [uniform_plan(dp=8), uniform_plan(tp=2, pp=2, dp=2), uniform_plan(tp=4, pp=2, dp=1)]
    jobs = [
        SyntheticJob(
            f"team-{i % 20}",
            f"train-{i:04d}",
            shapes[i % len(shapes)],
            slow={i % 8: 1.3},
            memory_offset_bytes={(i + 3) % 8: 2 * GIB},
        )
        for i in range(args.jobs)
    ]
    rng = random.Random(0)
    states = {j.job: JobWindows() for j in jobs}
    om = OperatorMetrics()
    exporter = JobMetricsExporter()
    step = 0
    for step in range(settings.window_size):
        for j in jobs:
            states[j.job] = ingest(states[j.job], j.samples(step, rng), settings)
    for j in jobs:
        states[j.job], result = analyse(states[j.job], j.plan, settings)
        exporter.update_job(j.namespace, j.job, result)
        exporter.observe_status(j.namespace, j.job, {"phase": "Running", "restarts": 0})
        om.observe_job((j.namespace, j.job), {"phase": "Running", "layout": {"tensor": j.plan.tp}})

    # -- one analysis pass over every job (new step per rank), then the exporter update
    pending = {j.job: [j.samples(settings.window_size + k, rng) for k in range(args.repeats)] for j in jobs}
    analysis_ms: tuple[list[float], list[float]] = ([], [])
    update_ms: tuple[list[float], list[float]] = ([], [])
    for k in range(args.repeats):
        results = {}
        t0, c0 = time.perf_counter(), time.process_time()
        for j in jobs:
            state = ingest(states[j.job], pending[j.job][k], settings)
            states[j.job], results[j.job] = analyse(state, j.plan, settings)
        t1, c1 = time.perf_counter(), time.process_time()
        for j in jobs:
            exporter.update_job(j.namespace, j.job, results[j.job])
        t2, c2 = time.perf_counter(), time.process_time()
        analysis_ms[0].append((t1 - t0) * 1000)
        analysis_ms[1].append((c1 - c0) * 1000)
        update_ms[0].append((t2 - t1) * 1000)
        update_ms[1].append((c2 - c1) * 1000)

    # -- the scrape
    body = exposition(om.registry, exporter)
    scrape_ms = timed(lambda: exposition(om.registry, exporter), args.repeats)
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    registry = CollectorRegistry()
    registry.register(exporter)
    slow_ms = timed(lambda: generate_latest(registry), max(3, args.repeats // 5))

    page = trainer_page(jobs[0], step)
    parse_ms = timed(lambda: parse_trainer_metrics(page), args.repeats * 5)

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    scrape = summary(scrape_ms)
    report = {
        "meta": {
            "jobs": args.jobs,
            "ranks_per_job": args.ranks,
            "window_size": settings.window_size,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "target_ms_per_scrape": TARGET_MS,
            "repeats": args.repeats,
            "load_average": load,
        },
        "scrape": {
            **scrape,
            "bytes": len(body),
            "series": series,
            "meets_target_cpu": scrape["cpu_median_ms"] < TARGET_MS,
            "meets_target_wall": scrape["median_ms"] < TARGET_MS,
        },
        "scrape_generate_latest_reference": summary(slow_ms),
        "analysis_pass_all_jobs": summary(analysis_ms),
        "analysis_per_job_cpu_median_ms": round(statistics.median(analysis_ms[1]) / args.jobs, 4),
        "exporter_update_all_jobs": summary(update_ms),
        "parse_one_pod_page_8_ranks": summary(parse_ms),
    }
    print(json.dumps(report, indent=2))
    if args.no_write:
        return 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    a, u, p, ref = (
        report["analysis_pass_all_jobs"],
        report["exporter_update_all_jobs"],
        report["parse_one_pod_page_8_ranks"],
        report["scrape_generate_latest_reference"],
    )
    rows = [
        ("scrape: the operator's `/metrics` body (`exposition`)", scrape),
        ("reference: `generate_latest` over the exporter's collector", ref),
        ("analysis pass, all jobs (ingest 1 step per rank + analyse)", a),
        ("exporter `update_job`, all jobs (text re-render)", u),
        ("parse one pod's trainer page (8 ranks)", p),
    ]
    table = "\n".join(
        f"| {what} | {r['median_ms']} | {r['p90_ms']} | {r['cpu_median_ms']} | {r['cpu_p90_ms']} |"
        for what, r in rows
    )
    verdict_cpu = "yes" if scrape["cpu_median_ms"] < TARGET_MS else "NO"
    verdict_wall = "yes" if scrape["median_ms"] < TARGET_MS else "NO"
    md = f"""# Metrics benchmark ({args.jobs} jobs x {args.ranks} ranks)

One process (one CPU core), Python {platform.python_version()}, {args.repeats} repeats. Synthetic
state: every rank's window full ({settings.window_size} steps); shapes DP8, TP2xPP2xDP2, TP4xPP2.
Target: under {TARGET_MS:.0f} ms per scrape. Load average during the run: {load} (wall times
include waiting for a shared core; CPU times do not).

| what | median ms (wall) | p90 ms (wall) | median ms (CPU) | p90 ms (CPU) |
|---|---:|---:|---:|---:|
{table}

Scrape body: {len(body):,} bytes, {series:,} series. Under the target: CPU median {verdict_cpu},
wall median {verdict_wall}.
Analysis CPU per job and pass: {report["analysis_per_job_cpu_median_ms"]} ms (one pass per job per
scrape interval, 15 s by default).
"""
    (RESULTS / "metrics.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
