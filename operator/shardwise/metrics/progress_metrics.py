"""Prometheus series of a job's ``status.progress`` (names, units and labels: docs/metrics.md)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

JOB_LABELS: Final = ("namespace", "job")
KIND_LABELS: Final = ("namespace", "job", "kind")

#: (name, type, help, labels) of every progress family, in output order.
PROGRESS_FAMILIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("shardwise_job_step", "gauge", "Last optimizer step every rank of the job completed.", JOB_LABELS),
    ("shardwise_job_total_steps", "gauge", "Optimizer steps the job is to complete.", JOB_LABELS),
    ("shardwise_job_progress_ratio", "gauge", "Completed steps / total steps (1 = done).", JOB_LABELS),
    (
        "shardwise_job_samples_per_second",
        "gauge",
        "Samples per second of the whole job at the pace of its steps (checkpoints, evaluations included).",
        JOB_LABELS,
    ),
    (
        "shardwise_job_mfu_ratio",
        "gauge",
        "Measured model FLOPs utilisation: model FLOPs per second / (GPUs x the planned GPU's peak).",
        JOB_LABELS,
    ),
    (
        "shardwise_job_planned_mfu_ratio",
        "gauge",
        "The MFU the planner's step-time estimate assumed.",
        JOB_LABELS,
    ),
    (
        "shardwise_job_step_seconds",
        "gauge",
        "Step time: kind=predicted (the planner's estimate), kind=measured (slowest rank, last step).",
        KIND_LABELS,
    ),
    (
        "shardwise_job_loss",
        "gauge",
        "Training loss: kind=latest (last step), kind=smoothed (moving average), kind=validation.",
        KIND_LABELS,
    ),
    ("shardwise_job_eta_seconds", "gauge", "Seconds until the last step at the current pace.", JOB_LABELS),
    ("shardwise_job_eta_timestamp_seconds", "gauge", "Unix time the last step is expected.", JOB_LABELS),
    (
        "shardwise_job_deadline_timestamp_seconds",
        "gauge",
        "Unix time the job's spec.runPolicy.activeDeadlineSeconds runs out (absent without a deadline).",
        JOB_LABELS,
    ),
    (
        "shardwise_job_progress_timestamp_seconds",
        "gauge",
        "Unix time of the job's last completed step (the trainer's clock).",
        JOB_LABELS,
    ),
)
PROGRESS_NAMES: Final = tuple(name for name, _, _, _ in PROGRESS_FAMILIES)

Series = list[tuple[list[str], float]]


def _unix(rfc3339: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(rfc3339).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def progress_series(
    key: tuple[str, str], progress: Mapping[str, Any], deadline: float | None = None
) -> dict[str, Series]:
    """Every progress series of one job, by family name (absent figures give no series)."""
    job = list(key)
    out: dict[str, Series] = {name: [] for name in PROGRESS_NAMES}

    def put(name: str, value: Any, *extra: str) -> None:
        if value is not None and math.isfinite(float(value)):
            out[name].append(([*job, *extra], float(value)))

    step, total = progress.get("step"), progress.get("totalSteps")
    put("shardwise_job_step", step)
    put("shardwise_job_total_steps", total)
    if step is not None and total:
        put("shardwise_job_progress_ratio", min(1.0, float(step) / float(total)))
    put("shardwise_job_samples_per_second", progress.get("samplesPerSecond"))
    put("shardwise_job_mfu_ratio", progress.get("mfu"))
    put("shardwise_job_planned_mfu_ratio", progress.get("plannedMfu"))
    put("shardwise_job_step_seconds", progress.get("predictedStepSeconds"), "predicted")
    put("shardwise_job_step_seconds", progress.get("measuredStepSeconds"), "measured")
    put("shardwise_job_loss", progress.get("loss"), "latest")
    put("shardwise_job_loss", progress.get("smoothedLoss"), "smoothed")
    put("shardwise_job_loss", progress.get("validationLoss"), "validation")
    put("shardwise_job_eta_seconds", progress.get("remainingSeconds"))
    put("shardwise_job_eta_timestamp_seconds", _unix(progress["eta"]) if progress.get("eta") else None)
    put("shardwise_job_deadline_timestamp_seconds", deadline)
    updated = progress.get("lastUpdateTime")
    put("shardwise_job_progress_timestamp_seconds", _unix(updated) if updated else None)
    return out
