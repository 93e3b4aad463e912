"""The Grafana dashboards: generated, well-formed, with the required panels (pure structure).

Their PromQL is checked by a real PromQL engine (promtool) in test_promql_queries.py; the live
version (PromQL against a Prometheus scraping a running operator) is an integration test.
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from tests.unit.test_exporter import operator_metrics, realistic

from shardwise.metrics.exporter import JobMetricsExporter, exposition
from shardwise_trainer import metrics as trainer_metrics

ROOT = Path(__file__).resolve().parents[2]
BOARDS = ROOT / "charts" / "shardwise" / "dashboards"
RULES = ROOT / "charts" / "shardwise" / "files" / "prometheus-rules.yaml"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_dashboards", ROOT / "hack" / "gen-dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(BOARDS.glob("*.json"))}


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expr) of every panel target of every committed dashboard."""
    out = []
    for name, board in committed().items():
        for panel in board["panels"]:
            for t in panel.get("targets", []):
                out.append((f"{name}: {panel['title']} {t['refId']}", t["expr"]))
    return out


@cache
def real_series() -> dict[str, set[str]]:
    """Sample name -> label names, from real renders of everything the dashboards may query."""
    exporter = JobMetricsExporter()
    realistic(exporter)
    texts = [exposition(operator_metrics().registry, exporter).decode()]
    stats = {
        "labels": dict.fromkeys(trainer_metrics.LABELS, "0"),
        **{name: 1.0 for name, _, _ in trainer_metrics.METRICS if name != "memory_bytes"},
        "memory_bytes": {"peak_reserved": 1},
    }
    texts.append(trainer_metrics.render([stats]))
    out: dict[str, set[str]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, set()).update(sample.labels)
    return out


def test_committed_json_equals_the_generators_output() -> None:
    gen = generator()
    boards = gen.dashboards()
    assert sorted(boards) == sorted(p.name for p in BOARDS.glob("*.json"))
    for name, board in boards.items():
        assert (BOARDS / name).read_text() == gen.render(board), f"{name}: run python hack/gen-dashboards.py"
    assert gen.main(["--check"]) == 0


def test_real_render_is_complete() -> None:
    names = real_series()
    for expected in (
        "shardwise_gpu_memory_used_bytes",
        "shardwise_job_layout_info",
        "shardwise_jobs",
        "shardwise_operator_reconcile_duration_seconds_bucket",
        "shardwise_scrape_errors_total",
        "shardwise_trainer_step_seconds",
    ):
        assert expected in names


def test_template_variables_query_real_labels() -> None:
    series = real_series()
    for name, board in committed().items():
        variables = board["templating"]["list"]
        assert variables[0]["type"] == "datasource" and variables[0]["query"] == "prometheus", name
        for var in variables[1:]:
            m = re.fullmatch(r"label_values\((\w+)(\{[^}]*\})?,\s*(\w+)\)", var["definition"])
            assert m, f"{name}: {var['definition']}"
            assert m.group(3) in series[m.group(1)], f"{name}: {var['definition']}"
            assert var["query"]["query"] == var["definition"]


def test_dashboards_are_well_formed() -> None:
    boards = committed()
    assert len(boards) == 5
    uids = [b["uid"] for b in boards.values()]
    assert len(set(uids)) == len(uids)
    for name, board in boards.items():
        assert len(board["uid"]) <= 40 and board["title"].startswith("shardwise / ")
        assert board["schemaVersion"] >= 36 and "shardwise" in board["tags"]
        panels = board["panels"]
        assert len({p["id"] for p in panels}) == len(panels)
        cells: set[tuple[int, int]] = set()
        for p in panels:
            where = f"{name}: {p['title']}"
            pos = p["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, where
            mine = {
                (x, y)
                for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])
            }
            assert not mine & cells, f"{where}: overlaps another panel"
            cells |= mine
            assert p["type"] in ("timeseries", "stat", "table", "barchart", "heatmap"), where
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            refs = [t["refId"] for t in p["targets"]]
            assert refs and len(set(refs)) == len(refs), where
            for t in p["targets"]:
                assert t["datasource"] == p["datasource"] and t["expr"].strip(), where
            for o in p["fieldConfig"]["overrides"]:
                if o["matcher"]["id"] == "byFrameRefID":
                    assert o["matcher"]["options"] in refs, where


def test_the_required_panels_exist() -> None:
    boards = committed()

    def exprs(board: str) -> str:
        return " ".join(t["expr"] for p in boards[board]["panels"] for t in p["targets"])

    overview = exprs("shardwise-job-overview.json")
    for metric in ("shardwise_job_layout_info", "shardwise_job_phase", "shardwise_job_tokens_per_second"):
        assert metric in overview
    memory = exprs("shardwise-gpu-memory.json")
    for metric in ("used_bytes", "predicted_bytes", "capacity_bytes"):
        assert f"shardwise_gpu_memory_{metric}" in memory
    strag = exprs("shardwise-stragglers.json")
    assert "shardwise_rank_straggler_score" in strag and "shardwise_rank_straggler{" in strag
    assert "shardwise_rank_compute_seconds" in strag and "shardwise_rank_communication_seconds" in strag
    titles = [p["title"] for p in boards["shardwise-stragglers.json"]["panels"]]
    assert "Current stragglers" in titles and "Straggler score per rank" in titles
    progress = exprs("shardwise-training-progress.json")
    for metric in ("loss", "mfu_ratio", "planned_mfu_ratio", "eta_seconds", "step_seconds"):
        assert f"shardwise_job_{metric}" in progress
    assert "shardwise_rank_compute_seconds" in progress
    kinds = {p["type"] for p in boards["shardwise-training-progress.json"]["panels"]}
    assert "heatmap" in kinds
    health = exprs("shardwise-operator.json")
    assert "shardwise_operator_reconcile_duration_seconds" in health and "shardwise_jobs" in health
