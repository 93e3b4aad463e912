#!/usr/bin/env python3
"""Generate the Grafana dashboards of charts/shardwise/dashboards/ (docs/metrics.md).

    python hack/gen-dashboards.py           # (re)write the JSON files
    python hack/gen-dashboards.py --check   # exit 1 when a committed file differs

Plain Python (no dependency): one helper per panel kind, one function per dashboard. The JSON
targets Grafana 10 / 11 (schemaVersion 39) and the Grafana sidecar of kube-prometheus-stack
(the chart ships each file as a ConfigMap). Every query uses the `datasource` variable and only
metrics the operator exports or the recording rules of charts/shardwise/files/
prometheus-rules.yaml (tests/unit/test_dashboards.py checks it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "charts" / "shardwise" / "dashboards"
SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${datasource}"}
JOB = 'namespace=~"$namespace", job=~"$job"'  # the label matchers of a job-scoped query

Json = dict[str, Any]


# --------------------------------------------------------------------------- building blocks


def target(expr: str, legend: str = "", *, ref: str = "A", table: bool = False) -> Json:
    """A Prometheus query; ``table``: an instant query in table format (tables, bar charts)."""
    return {
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "refId": ref,
        "range": not table,
        "instant": table,
        "format": "table" if table else "time_series",
    }


def targets(*queries: tuple[str, str], table: bool = False) -> list[Json]:
    return [target(q, legend, ref=chr(ord("A") + i), table=table) for i, (q, legend) in enumerate(queries)]


def override_ref(ref: str, **props: Any) -> Json:
    """Field properties for the series of one query (``custom.drawStyle`` -> custom_drawStyle)."""
    return {
        "matcher": {"id": "byFrameRefID", "options": ref},
        "properties": [{"id": k.replace("custom_", "custom."), "value": v} for k, v in props.items()],
    }


def dashed(color: str) -> Json:
    return {
        "custom_drawStyle": "line",
        "custom_lineStyle": {"fill": "dash", "dash": [10, 10]},
        "custom_lineWidth": 2,
        "custom_fillOpacity": 0,
        "color": {"mode": "fixed", "fixedColor": color},
    }


def thresholds(*steps: tuple[float | None, str]) -> Json:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


class Grid:
    """Places panels left to right, wrapping at Grafana's 24 columns; numbers them."""

    def __init__(self) -> None:
        self.panels: list[Json] = []
        self.x = self.y = self.row_h = 0

    def add(self, panel: Json, w: int, h: int) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel = {"id": len(self.panels) + 1, "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h}, **panel}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def timeseries(
    title: str,
    queries: list[Json],
    *,
    unit: str = "short",
    description: str = "",
    overrides: list[Json] | None = None,
    draw: str = "line",
    minimum: float | None = None,
) -> Json:
    defaults: Json = {
        "unit": unit,
        "custom": {
            "drawStyle": draw,
            "lineWidth": 1,
            "fillOpacity": 80 if draw == "bars" else 10,
            "showPoints": "never",
            "spanNulls": False,
        },
    }
    if minimum is not None:
        defaults["min"] = minimum
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": queries,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "right",
                "calcs": ["lastNotNull", "max"],
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    queries: list[Json],
    *,
    unit: str = "short",
    description: str = "",
    steps: Json | None = None,
    text_mode: str = "auto",
) -> Json:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": queries,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": steps or thresholds((None, "green")),
                "color": {"mode": "thresholds"},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "none",
            "textMode": text_mode,
            "justifyMode": "auto",
            "orientation": "auto",
        },
    }


def heatmap(title: str, queries: list[Json], *, unit: str = "s", description: str = "") -> Json:
    """One row per series (rank), colour = value: Grafana's heatmap without bucketing."""
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": queries,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {
                "mode": "scheme",
                "scheme": "Oranges",
                "steps": 64,
                "exponent": 0.5,
                "fill": "dark-orange",
            },
            "yAxis": {"axisPlacement": "left", "unit": "none"},
            "rowsFrame": {"layout": "auto"},
            "legend": {"show": True},
            "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": True},
            "cellValues": {"unit": unit},
        },
    }


def organize(hide: list[str], rename: dict[str, str], order: list[str]) -> Json:
    return {
        "id": "organize",
        "options": {
            "excludeByName": dict.fromkeys(hide, True),
            "renameByName": rename,
            "indexByName": {name: i for i, name in enumerate(order)},
        },
    }


def table(
    title: str,
    queries: list[Json],
    transformations: list[Json],
    *,
    description: str = "",
    overrides: list[Json] | None = None,
    unit: str = "short",
) -> Json:
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": queries,
        "transformations": transformations,
        "fieldConfig": {
            "defaults": {"unit": unit, "custom": {"align": "auto"}},
            "overrides": overrides or [],
        },
        "options": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}},
    }


def by_name(name: str, **props: Any) -> Json:
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": k.replace("custom_", "custom."), "value": v} for k, v in props.items()],
    }


def variables(*, multi_job: bool) -> Json:
    def query_var(name: str, query: str, multi: bool) -> Json:
        return {
            "name": name,
            "label": name.capitalize(),
            "type": "query",
            "datasource": DS,
            "definition": query,
            "query": {"query": query, "refId": f"{name}-variable"},
            "refresh": 2,
            "sort": 1,
            "multi": multi,
            "includeAll": multi,
            "allValue": ".*" if multi else None,
            "current": {},
            "options": [],
            "hide": 0,
            "regex": "",
        }

    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "options": [],
                "hide": 0,
                "refresh": 1,
                "regex": "",
            },
            query_var("namespace", "label_values(shardwise_job_phase, namespace)", True),
            query_var("job", 'label_values(shardwise_job_phase{namespace=~"$namespace"}, job)', multi_job),
        ]
    }


def dashboard(
    uid: str, title: str, description: str, grid: Grid, *, multi_job: bool = True, job_vars: bool = True
) -> Json:
    templating = variables(multi_job=multi_job)
    if not job_vars:
        templating["list"] = templating["list"][:1]
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["shardwise"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "annotations": {"list": []},
        "links": [
            {
                "title": "shardwise",
                "type": "dashboards",
                "tags": ["shardwise"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "templating": templating,
        "panels": grid.panels,
    }


# --------------------------------------------------------------------------- dashboards

RANK_LEGEND = "rank {{rank}} (stage {{stage}}, {{node}} GPU {{gpu}})"


def job_overview() -> Json:
    g = Grid()
    g.add(
        stat(
            "Phase",
            targets((f"shardwise_job_phase{{{JOB}}} == 1", "{{namespace}}/{{job}}: {{phase}}")),
            text_mode="name",
            description="status.phase of the selected jobs.",
        ),
        6,
        4,
    )
    g.add(
        stat(
            "Ranks reporting",
            targets((f"sum(shardwise_job_ranks_reporting{{{JOB}}})", "ranks")),
            description="Ranks whose stats the operator received.",
        ),
        3,
        4,
    )
    g.add(
        stat(
            "Stragglers",
            targets((f"sum(shardwise_job_stragglers{{{JOB}}})", "stragglers")),
            steps=thresholds((None, "green"), (1, "red")),
        ),
        3,
        4,
    )
    g.add(
        stat(
            "Restarts",
            targets((f"sum(shardwise_job_restarts{{{JOB}}})", "restarts")),
            steps=thresholds((None, "green"), (1, "orange"), (3, "red")),
        ),
        3,
        4,
    )
    g.add(
        stat(
            "Throughput (tokens/s)", targets((f"sum(shardwise_job_tokens_per_second{{{JOB}}})", "tokens/s"))
        ),
        4,
        4,
    )
    g.add(
        stat(
            "Memory imbalance (max / mean)",
            targets((f"max(shardwise_job_memory_imbalance_ratio{{{JOB}}})", "max/mean")),
            unit="none",
            steps=thresholds((None, "green"), (1.1, "orange"), (1.25, "red")),
        ),
        5,
        4,
    )
    g.add(
        table(
            "Layout",
            targets((f"shardwise_job_layout_info{{{JOB}}}", ""), table=True),
            [
                organize(
                    ["Time", "Value", "__name__", "instance", "endpoint", "service", "container"],
                    {"tp": "TP", "pp": "PP", "dp": "DP", "zero_stage": "ZeRO stage"},
                    ["namespace", "job", "tp", "pp", "dp", "zero_stage", "summary"],
                )
            ],
            description="The planned layout of each job (shardwise_job_layout_info).",
        ),
        16,
        6,
    )
    g.add(
        stat(
            "Jobs by phase (all namespaces)",
            targets(("sum by (phase) (shardwise_jobs)", "{{phase}}")),
            text_mode="value_and_name",
        ),
        8,
        6,
    )
    g.add(
        timeseries(
            "Throughput (tokens/s)",
            targets((f"shardwise_job_tokens_per_second{{{JOB}}}", "{{namespace}}/{{job}}")),
            description="Sum over data-parallel replicas of their slowest rank.",
            minimum=0,
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Step time per rank",
            targets((f"shardwise_rank_step_seconds{{{JOB}}}", "{{job}} " + RANK_LEGEND)),
            unit="s",
            minimum=0,
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Fullest GPU (of capacity)",
            targets(
                (f"namespace_job:shardwise_gpu_memory_utilisation:max{{{JOB}}}", "{{namespace}}/{{job}}")
            ),
            unit="percentunit",
            minimum=0,
        ),
        12,
        7,
    )
    g.add(
        timeseries(
            "Stragglers", targets((f"shardwise_job_stragglers{{{JOB}}}", "{{namespace}}/{{job}}")), minimum=0
        ),
        12,
        7,
    )
    return dashboard(
        "shardwise-job-overview",
        "shardwise / Job overview",
        "Layout, phase and throughput of ParallelTrainingJobs.",
        g,
    )


def gpu_memory() -> Json:
    g = Grid()
    g.add(
        timeseries(
            "Peak memory per GPU, predicted and capacity",
            targets(
                (f"shardwise_gpu_memory_used_bytes{{{JOB}}}", RANK_LEGEND),
                (
                    f"max by (stage) (shardwise_gpu_memory_predicted_bytes{{{JOB}}})",
                    "predicted, stage {{stage}}",
                ),
                (f"max(shardwise_gpu_memory_capacity_bytes{{{JOB}}})", "capacity"),
            ),
            unit="bytes",
            draw="bars",
            minimum=0,
            description="Bars: each GPU's peak memory over the analysis window. Dashed: the plan's "
            "prediction per pipeline stage and the GPU capacity.",
            overrides=[override_ref("B", **dashed("green")), override_ref("C", **dashed("red"))],
        ),
        24,
        10,
    )
    g.add(
        {
            "type": "barchart",
            "title": "Now: used vs predicted vs capacity per rank",
            "description": "The latest figures of each GPU (x: rank).",
            "datasource": DS,
            "targets": targets(
                (f"shardwise_gpu_memory_used_bytes{{{JOB}}}", ""),
                (f"shardwise_gpu_memory_predicted_bytes{{{JOB}}}", ""),
                (f"shardwise_gpu_memory_capacity_bytes{{{JOB}}}", ""),
                table=True,
            ),
            "transformations": [
                {"id": "merge", "options": {}},
                organize(
                    ["Time", "namespace", "job", "pod", "node", "gpu", "stage", "instance"],
                    {"Value #A": "used", "Value #B": "predicted", "Value #C": "capacity"},
                    ["rank", "Value #A", "Value #B", "Value #C"],
                ),
                {"id": "sortBy", "options": {"sort": [{"field": "rank"}]}},
            ],
            "fieldConfig": {
                "defaults": {"unit": "bytes", "min": 0, "custom": {"fillOpacity": 80, "lineWidth": 1}},
                "overrides": [by_name("capacity", color={"mode": "fixed", "fixedColor": "#8080804D"})],
            },
            "options": {
                "xField": "rank",
                "orientation": "vertical",
                "groupWidth": 0.8,
                "barWidth": 0.95,
                "showValue": "never",
                "stacking": "none",
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "none"},
            },
        },
        12,
        9,
    )
    g.add(
        table(
            "Per GPU",
            targets(
                (f"shardwise_gpu_memory_used_bytes{{{JOB}}}", ""),
                (f"shardwise_gpu_memory_predicted_bytes{{{JOB}}}", ""),
                (f"shardwise_gpu_memory_capacity_bytes{{{JOB}}}", ""),
                (f"shardwise_gpu_memory_prediction_error_ratio{{{JOB}}}", ""),
                (
                    f"shardwise_gpu_memory_capacity_bytes{{{JOB}}}"
                    f" - shardwise_gpu_memory_used_bytes{{{JOB}}}",
                    "",
                ),
                table=True,
            ),
            [
                {"id": "merge", "options": {}},
                organize(
                    ["Time", "namespace", "job", "instance"],
                    {
                        "Value #A": "used",
                        "Value #B": "predicted",
                        "Value #C": "capacity",
                        "Value #D": "error",
                        "Value #E": "headroom",
                    },
                    [
                        "rank",
                        "stage",
                        "pod",
                        "node",
                        "gpu",
                        "Value #A",
                        "Value #B",
                        "Value #C",
                        "Value #D",
                        "Value #E",
                    ],
                ),
                {"id": "sortBy", "options": {"sort": [{"field": "rank"}]}},
            ],
            unit="bytes",
            overrides=[
                by_name("error", unit="percentunit"),
                by_name("rank", unit="none"),
                by_name("stage", unit="none"),
                by_name("gpu", unit="none"),
            ],
        ),
        12,
        9,
    )
    g.add(
        timeseries(
            "Prediction error per GPU",
            targets((f"shardwise_gpu_memory_prediction_error_ratio{{{JOB}}}", RANK_LEGEND)),
            unit="percentunit",
            description="(used - predicted) / predicted; alert above 25 % either way.",
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Imbalance within each pipeline stage",
            targets(
                (f"shardwise_stage_memory_spread_ratio{{{JOB}}}", "spread (max-min)/max, stage {{stage}}"),
                (f"shardwise_stage_memory_imbalance_ratio{{{JOB}}} - 1", "max/mean - 1, stage {{stage}}"),
                (f"shardwise_job_memory_variation_ratio{{{JOB}}}", "coefficient of variation, job"),
            ),
            unit="percentunit",
            minimum=0,
            description="MemoryImbalanced is set when a stage's spread exceeds memoryImbalanceThreshold.",
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Model states per GPU vs plan",
            targets(
                (f"shardwise_gpu_model_state_bytes{{{JOB}}}", RANK_LEGEND),
                (
                    f"max by (stage) (shardwise_gpu_model_state_predicted_bytes{{{JOB}}})",
                    "predicted, stage {{stage}}",
                ),
            ),
            unit="bytes",
            minimum=0,
            overrides=[override_ref("B", **dashed("green"))],
        ),
        24,
        8,
    )
    return dashboard(
        "shardwise-gpu-memory",
        "shardwise / GPU memory",
        "Per-GPU peak memory against the plan's prediction and the capacity; balance.",
        g,
        multi_job=False,
    )


def stragglers() -> Json:
    g = Grid()
    g.add(
        stat(
            "Stragglers now",
            targets((f"sum(shardwise_job_stragglers{{{JOB}}})", "stragglers")),
            steps=thresholds((None, "green"), (1, "red")),
        ),
        8,
        4,
    )
    g.add(
        stat(
            "Highest score",
            targets((f"max(namespace_job:shardwise_rank_straggler_score:max{{{JOB}}})", "score")),
            unit="none",
            steps=thresholds((None, "green"), (1.1, "orange"), (1.2, "red")),
        ),
        8,
        4,
    )
    g.add(
        stat(
            "Threshold (score)",
            targets((f"1 + max(shardwise_job_straggler_threshold_ratio{{{JOB}}})", "threshold")),
            unit="none",
        ),
        8,
        4,
    )
    g.add(
        timeseries(
            "Straggler score per rank",
            targets(
                (f"shardwise_rank_straggler_score{{{JOB}}}", RANK_LEGEND),
                (f"1 + shardwise_job_straggler_threshold_ratio{{{JOB}}}", "threshold"),
            ),
            unit="none",
            description="A rank's median compute time (outside collectives) over the window / the median "
            "of the other ranks of its pipeline stage; for a stage of one rank, its compute share of the "
            "step / the other stages'. Flagged after stragglerWindows (3) windows above the threshold.",
            overrides=[override_ref("B", **dashed("red"))],
        ),
        24,
        10,
    )
    g.add(
        table(
            "Current stragglers",
            targets(
                (
                    f"shardwise_rank_straggler_score{{{JOB}}} and on (namespace, job, rank) "
                    f"(shardwise_rank_straggler{{{JOB}}} == 1)",
                    "",
                ),
                table=True,
            ),
            [
                organize(
                    ["Time", "__name__", "instance"],
                    {"Value": "score"},
                    ["namespace", "job", "rank", "stage", "pod", "node", "gpu", "Value"],
                )
            ],
            unit="none",
        ),
        24,
        6,
    )
    g.add(
        timeseries(
            "Compute time per rank",
            targets((f"shardwise_rank_compute_seconds{{{JOB}}}", RANK_LEGEND)),
            unit="s",
            minimum=0,
            description="Median time per step outside collectives: what the score compares. A slow rank "
            "computes longer; its peers wait for it inside the collectives.",
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Communication time per rank",
            targets((f"shardwise_rank_communication_seconds{{{JOB}}}", RANK_LEGEND)),
            unit="s",
            minimum=0,
            description="Median time per step inside collectives, waits for slower peers included.",
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Step time per rank",
            targets((f"shardwise_rank_step_seconds{{{JOB}}}", RANK_LEGEND)),
            unit="s",
            minimum=0,
            description="Wall time per step: with synchronous collectives it evens out across ranks.",
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Tokens per second per rank",
            targets((f"shardwise_rank_tokens_per_second{{{JOB}}}", RANK_LEGEND)),
            minimum=0,
        ),
        12,
        8,
    )
    return dashboard(
        "shardwise-stragglers",
        "shardwise / Stragglers",
        "Straggler score per rank, current stragglers, compute, communication and step times.",
        g,
        multi_job=False,
    )


def training_progress() -> Json:
    g = Grid()
    g.add(
        stat(
            "Progress",
            targets((f"max(shardwise_job_progress_ratio{{{JOB}}})", "done")),
            unit="percentunit",
            description="Completed optimizer steps / total steps (status.progress.percent).",
        ),
        6,
        4,
    )
    g.add(
        stat(
            "ETA",
            targets((f"max(shardwise_job_eta_seconds{{{JOB}}})", "remaining")),
            unit="s",
            description="Time to the last step at the current pace (checkpoints and evaluations included).",
        ),
        6,
        4,
    )
    g.add(
        stat(
            "Measured MFU",
            targets((f"max(shardwise_job_mfu_ratio{{{JOB}}})", "MFU")),
            unit="percentunit",
            description="Model FLOPs per second (recompute excluded) / (GPUs x the planned GPU's peak).",
        ),
        6,
        4,
    )
    g.add(
        stat(
            "Step",
            targets(
                (f"max(shardwise_job_step{{{JOB}}})", "step"),
                (f"max(shardwise_job_total_steps{{{JOB}}})", "of"),
            ),
            unit="none",
        ),
        6,
        4,
    )
    g.add(
        timeseries(
            "Loss",
            targets(
                (f"shardwise_job_loss{{{JOB}}}", "{{job}} {{kind}}"),
            ),
            unit="none",
            description="Training loss of the last step, its moving average (smoothed), the validation loss.",
        ),
        12,
        9,
    )
    g.add(
        timeseries(
            "Tokens per second",
            targets(
                (f"shardwise_job_tokens_per_second{{{JOB}}}", "{{job}} tokens/s"),
            ),
            minimum=0,
            description="Throughput of the whole job: sum over data-parallel replicas of their slowest rank.",
        ),
        12,
        9,
    )
    g.add(
        timeseries(
            "MFU against the plan",
            targets(
                (f"shardwise_job_mfu_ratio{{{JOB}}}", "{{job}} measured"),
                (f"shardwise_job_planned_mfu_ratio{{{JOB}}}", "{{job}} planned"),
            ),
            unit="percentunit",
            minimum=0,
            overrides=[override_ref("B", **dashed("blue"))],
        ),
        12,
        9,
    )
    g.add(
        timeseries(
            "Step time: measured vs predicted",
            targets((f"shardwise_job_step_seconds{{{JOB}}}", "{{job}} {{kind}}")),
            unit="s",
            minimum=0,
            description="measured: the slowest rank's last step; predicted: the planner's estimate.",
        ),
        12,
        9,
    )
    g.add(
        timeseries(
            "ETA",
            targets(
                (f"shardwise_job_eta_seconds{{{JOB}}}", "{{job}} remaining"),
            ),
            unit="s",
            minimum=0,
            description="Seconds to the last step; alert ShardwiseEtaPastDeadline when the ETA falls after "
            "activeDeadlineSeconds.",
        ),
        12,
        8,
    )
    g.add(
        heatmap(
            "Compute time per rank",
            targets((f"shardwise_rank_compute_seconds{{{JOB}}}", "rank {{rank}}")),
            description="Median compute time per step of each rank over time: a straggler is a hot row.",
        ),
        12,
        8,
    )
    g.add(
        heatmap(
            "Step time per rank",
            targets((f"shardwise_rank_step_seconds{{{JOB}}}", "rank {{rank}}")),
            description="Median step time per rank: synchronous collectives even it out across ranks.",
        ),
        24,
        8,
    )
    return dashboard(
        "shardwise-training-progress",
        "shardwise / Training progress",
        "Progress, ETA, loss, throughput, measured MFU against the plan, measured vs predicted step time, "
        "per-rank compute and step time.",
        g,
        multi_job=False,
    )


def operator_health() -> Json:
    g = Grid()
    g.add(
        stat(
            "Jobs by phase",
            targets(("sum by (phase) (shardwise_jobs)", "{{phase}}")),
            text_mode="value_and_name",
        ),
        24,
        4,
    )
    g.add(
        timeseries(
            "Reconcile duration",
            targets(
                ("shardwise:operator_reconcile_duration_seconds:p99_5m", "p99"),
                (
                    "histogram_quantile(0.5, sum by (le) "
                    "(rate(shardwise_operator_reconcile_duration_seconds_bucket[$__rate_interval])))",
                    "p50",
                ),
            ),
            unit="s",
            minimum=0,
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Reconciles and errors per second",
            targets(
                (
                    "sum(rate(shardwise_operator_reconcile_duration_seconds_count[$__rate_interval]))",
                    "reconciles",
                ),
                ("sum(rate(shardwise_operator_reconcile_errors_total[$__rate_interval]))", "errors"),
            ),
            unit="reqps",
            minimum=0,
            overrides=[override_ref("B", color={"mode": "fixed", "fixedColor": "red"})],
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Trainer stats read failures per pod",
            targets(
                ("namespace_job_pod:shardwise_scrape_errors:rate5m > 0", "{{namespace}}/{{job}} {{pod}}")
            ),
            unit="reqps",
            minimum=0,
            description="The operator could not read a trainer pod's stats endpoint.",
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Ranks reporting per job",
            targets(("shardwise_job_ranks_reporting", "{{namespace}}/{{job}}")),
            minimum=0,
        ),
        12,
        8,
    )
    g.add(
        timeseries("Jobs by phase", targets(("sum by (phase) (shardwise_jobs)", "{{phase}}")), minimum=0),
        24,
        7,
    )
    return dashboard(
        "shardwise-operator",
        "shardwise / Operator health",
        "Reconcile latency and errors, jobs by phase, trainer stats reads.",
        g,
        job_vars=False,
    )


def dashboards() -> dict[str, Json]:
    """File name -> dashboard."""
    return {
        "shardwise-job-overview.json": job_overview(),
        "shardwise-gpu-memory.json": gpu_memory(),
        "shardwise-stragglers.json": stragglers(),
        "shardwise-operator.json": operator_health(),
        "shardwise-training-progress.json": training_progress(),
    }


def render(board: Json) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a committed file differs")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    stale = []
    for name, board in dashboards().items():
        path = args.out / name
        text = render(board)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date (run hack/gen-dashboards.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
