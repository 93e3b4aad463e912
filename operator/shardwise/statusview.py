"""The `shardwise status` view of one job: status and operator metrics as a document, rendered with rich."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from shardwise.planner.units import GIB

#: Operator series read per rank (docs/metrics.md) -> the view's field.
RANK_SERIES: dict[str, str] = {
    "shardwise_rank_step_seconds": "stepSeconds",
    "shardwise_rank_compute_seconds": "computeSeconds",
    "shardwise_gpu_memory_used_bytes": "memoryBytes",
    "shardwise_gpu_memory_predicted_bytes": "predictedMemoryBytes",
    "shardwise_rank_straggler_score": "stragglerScore",
    "shardwise_rank_straggler": "straggler",
}


def rank_rows(metrics_text: str, namespace: str, name: str) -> list[dict[str, Any]]:
    """One row per rank of the job from the operator's /metrics text, ordered by rank."""
    rows: dict[int, dict[str, Any]] = {}
    for family in text_string_to_metric_families(metrics_text):
        field = RANK_SERIES.get(family.name)
        if field is None:
            continue
        for sample in family.samples:
            labels = sample.labels
            if labels.get("namespace") != namespace or labels.get("job") != name:
                continue
            rank = int(labels.get("rank", "0"))
            row = rows.setdefault(
                rank,
                {"rank": rank, "pod": labels.get("pod", ""), "node": labels.get("node", ""),
                 "stage": int(labels.get("stage", "0") or 0)},
            )  # fmt: skip
            row[field] = bool(sample.value) if field == "straggler" else float(sample.value)
    return [rows[r] for r in sorted(rows)]


def job_view(job: Mapping[str, Any], metrics_text: str | None = None) -> dict[str, Any]:
    """What `shardwise status -o json` prints: the job's status parts and, with the operator's
    metrics, its ranks (``ranks`` is None when the metrics endpoint was not read)."""
    meta, status = job.get("metadata") or {}, job.get("status") or {}
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    conditions = {
        str(c.get("type")): {"status": c.get("status"), "reason": c.get("reason")}
        for c in status.get("conditions") or []
    }
    return {
        "namespace": namespace,
        "name": name,
        "phase": status.get("phase"),
        "message": status.get("message"),
        "attempt": status.get("attempt"),
        "restarts": status.get("restarts"),
        "layout": status.get("layout"),
        "progress": status.get("progress"),
        "latestCheckpoint": status.get("latestCheckpoint"),
        "conditions": conditions,
        "ranks": rank_rows(metrics_text, namespace, name) if metrics_text is not None else None,
    }


def _num(value: Any, fmt: str = "{:.3g}", unit: str = "") -> str:
    return "-" if value is None else fmt.format(value) + unit


def _layout_line(layout: Mapping[str, Any]) -> str:
    parts = [
        str(layout.get("summary") or "?"),
        f"{layout.get('nodes', '?')}×{layout.get('gpusPerNode', '?')} GPUs",
        f"micro-batch {layout.get('microBatchSize', '?')}",
        f"accumulation {layout.get('gradientAccumulation', '?')}",
        f"checkpointing {layout.get('activationCheckpointing', '?')}",
        f"offload {layout.get('offload', '?')}",
    ]
    return ", ".join(parts)


def render(view: Mapping[str, Any]) -> RenderableType:
    """The terminal screen of one job (rich renderables; no I/O)."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("Job", f"{view['namespace']}/{view['name']}  [{view.get('phase') or 'Pending'}]")
    if view.get("layout"):
        head.add_row("Layout", _layout_line(view["layout"]))
    progress = view.get("progress") or {}
    if progress:
        total, step = progress.get("totalSteps"), progress.get("step", 0)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=float(total or 1), completed=float(step if total else 0), width=40),
            Text(str(progress.get("summary") or f"step {step}")),
        )
        head.add_row("Progress", bar)
        head.add_row("ETA", f"{progress.get('remaining', '-')} (at {progress.get('eta', '-')})")
        head.add_row(
            "Loss",
            f"{_num(progress.get('loss'), '{:.4g}')} latest, "
            f"{_num(progress.get('smoothedLoss'), '{:.4g}')} smoothed"
            + (
                f", {progress['validationLoss']:.4g} validation"
                if progress.get("validationLoss") is not None
                else ""
            ),
        )
        head.add_row(
            "Throughput",
            f"{_num(progress.get('tokensPerSecond'), '{:.4g}')} tokens/s, "
            f"{_num(progress.get('samplesPerSecond'), '{:.4g}')} samples/s",
        )
        head.add_row(
            "Step time",
            f"{_num(progress.get('measuredStepSeconds'), unit=' s')} measured, "
            f"{_num(progress.get('predictedStepSeconds'), unit=' s')} predicted, "
            f"{_num(progress.get('computeSeconds'), unit=' s')} compute",
        )
        if progress.get("mfu") is not None:
            head.add_row(
                "MFU",
                f"{progress['mfu']:.3g} measured vs {_num(progress.get('plannedMfu'))} planned "
                f"(peak of {progress.get('mfuGpu', '?')})",
            )
    else:
        head.add_row("Progress", "no step reported yet")
    checkpoint = view.get("latestCheckpoint")
    if checkpoint:
        head.add_row(
            "Checkpoint",
            f"step {checkpoint.get('step')} at {checkpoint.get('time')} ({checkpoint.get('path')}, "
            f"{checkpoint.get('layout')}, attempt {checkpoint.get('attempt')})",
        )
    if view.get("message"):
        head.add_row("Message", str(view["message"]))
    parts: list[RenderableType] = [head]
    ranks = view.get("ranks")
    if ranks:
        table = Table(title="Ranks", title_justify="left")
        for column in (
            "rank",
            "pod",
            "node",
            "stage",
            "step s",
            "compute s",
            "memory GiB",
            "plan GiB",
            "straggler",
        ):
            table.add_column(column, justify="left" if column in ("pod", "node") else "right")
        for r in ranks:
            score = _num(r.get("stragglerScore"), "{:.2f}") + (" SLOW" if r.get("straggler") else "")
            table.add_row(
                str(r["rank"]),
                r["pod"],
                r["node"],
                str(r["stage"]),
                _num(r.get("stepSeconds")),
                _num(r.get("computeSeconds")),
                _num(r["memoryBytes"] / GIB if r.get("memoryBytes") is not None else None, "{:.2f}"),
                _num(
                    r["predictedMemoryBytes"] / GIB if r.get("predictedMemoryBytes") is not None else None,
                    "{:.2f}",
                ),
                score,
            )
        parts.append(table)
    elif ranks is None:
        parts.append(
            Text("(per-rank figures: pass --metrics-url of the operator's metrics endpoint)", style="dim")
        )
    return Group(*parts)
