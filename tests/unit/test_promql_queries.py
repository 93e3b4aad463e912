"""Every dashboard query and recording rule, run by promtool's PromQL engine over the real series.

The series are those of real renders (the job-metrics exporter over a realistic state, the
operator's registry, the trainer's exposition) plus the shipped recording rules, evaluated by
`promtool test rules`. A query that names a metric no render has, or matches on a label or a
label value no render has, returns nothing and fails here (a syntax error fails promtool). The
alert expressions are checked by their own promtool unit tests (tests/promtool); the series those
tests feed must be real series.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests.unit.test_dashboards import RULES, committed, dashboard_queries
from tests.unit.test_exporter import operator_metrics, realistic

from shardwise.metrics.exporter import JobMetricsExporter, exposition
from shardwise_trainer import metrics as trainer_metrics

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL_TESTS = sorted((ROOT / "tests" / "promtool").glob("*.test.yaml"))
pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian prometheus) missing"
)

COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
# Target labels Prometheus adds at scrape time.
TARGET_LABELS = {"job", "instance"}


@cache
def real_samples() -> list[tuple[str, dict[str, str], float]]:
    exporter = JobMetricsExporter()
    realistic(exporter)
    texts = [exposition(operator_metrics().registry, exporter).decode()]
    stats = {
        "labels": dict.fromkeys(trainer_metrics.LABELS, "0"),
        **{name: 1.0 for name, _, _ in trainer_metrics.METRICS if name != "memory_bytes"},
        "memory_bytes": {"peak_reserved": 1},
    }
    texts.append(trainer_metrics.render([stats]))
    return [
        (s.name, dict(s.labels), s.value)
        for text in texts
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    ]


def series_notation(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def concrete(expr: str) -> str:
    """Grafana's variables as a dashboard with "All" selected sends them."""
    return re.sub(r"\$\w+", ".*", re.sub(r"\$__\w+", "5m", expr))


def queries() -> list[tuple[str, str]]:
    out = [(where, concrete(expr)) for where, expr in dashboard_queries()]
    for name, board in committed().items():
        for var in board["templating"]["list"][1:]:
            selector = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", var["definition"])
            out.append((f"{name}: variable {var['name']}", concrete(selector)))
    rules = yaml.safe_load(RULES.read_text())
    out += [
        (f"rule {r['record']}", r["record"]) for g in rules["groups"] for r in g["rules"] if "record" in r
    ]
    return out


def test_every_query_returns_data_over_the_real_series(tmp_path: Path) -> None:
    input_series = []
    for name, labels, value in real_samples():
        if math.isnan(value) or math.isinf(value):
            continue
        # Counters grow (so rate() > 0), everything else holds its rendered value.
        step = 1 if name.endswith(COUNTER_SUFFIXES) else 0
        input_series.append({"series": series_notation(name, labels), "values": f"{value:g}+{step}x20"})
    cases = [
        {"expr": f"count({expr}) > bool 0", "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 1}]}
        for _, expr in queries()
    ]
    test_file = tmp_path / "queries.test.yaml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(RULES)],
                "evaluation_interval": "1m",
                "tests": [{"interval": "1m", "input_series": input_series, "promql_expr_test": cases}],
            }
        )
    )
    done = subprocess.run(
        ["promtool", "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    # promtool names each failing expression (count(<query>) > bool 0) with what it got.
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_promtool_unit_tests_feed_real_series() -> None:
    """The alert tests' input series carry real metric names and labels (parsed by the Prometheus
    client's exposition parser: `name{labels}` is the exposition format without the value)."""
    real: dict[str, set[str]] = {}
    for name, labels, _ in real_samples():
        real.setdefault(name, set()).update(labels)
    for path in PROMTOOL_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for item in test.get("input_series", []):
                [family] = text_string_to_metric_families(item["series"] + " 0\n")
                [sample] = family.samples
                where = f"{path.name}: {item['series']}"
                assert sample.name in real, f"{where}: no render has {sample.name}"
                assert set(sample.labels) <= real[sample.name] | TARGET_LABELS, (
                    f"{where}: labels not in the real series"
                )
