"""The shipped Prometheus rules: valid for promtool, every alert and recording rule unit-tested."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "charts" / "shardwise" / "files" / "prometheus-rules.yaml"
TESTS = sorted((ROOT / "tests" / "promtool").glob("*.test.yaml"))

promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) missing")


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def unit_tests() -> list[dict[str, Any]]:
    return [t for path in TESTS for t in yaml.safe_load(path.read_text())["tests"]]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, check=False)


@promtool
def test_promtool_check_rules() -> None:
    done = run("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


@promtool
def test_promtool_test_rules() -> None:
    assert TESTS, "no tests/promtool/*.test.yaml"
    done = run("test", "rules", *map(str, TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(TESTS)


def test_file_is_a_rules_file_the_chart_can_wrap() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert list(doc) == ["groups"]
    assert all(g["name"].startswith("shardwise.") and g["rules"] for g in doc["groups"])
    for path in TESTS:
        files = yaml.safe_load(path.read_text())["rule_files"]
        assert [(path.parent / f).resolve() for f in files] == [RULES]


def test_every_alert_is_documented_and_fires_in_a_unit_test() -> None:
    fired = {
        case["alertname"]
        for test in unit_tests()
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    silent = {
        case["alertname"]
        for test in unit_tests()
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    alerts = [r for r in rules() if "alert" in r]
    assert len(alerts) >= 5
    for rule in alerts:
        name = rule["alert"]
        assert name.startswith("Shardwise") and name in fired and name in silent, name
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert {"summary", "description"} <= set(rule["annotations"])


def test_every_recording_rule_is_tested_or_used_by_an_alert() -> None:
    exprs = " ".join(
        [c["expr"] for t in unit_tests() for c in t.get("promql_expr_test", [])]
        + [r["expr"] for r in rules() if "alert" in r]
    )
    for rule in rules():
        if "record" in rule:
            assert rule["record"] in exprs, rule["record"]
            assert rule["record"].count(":") == 2  # level:metric:operations


def test_alerts_read_recording_rules_of_their_own_group_recorded_before_them() -> None:
    """Groups are evaluated independently: a recording rule of another group may lag an interval."""
    doc = yaml.safe_load(RULES.read_text())
    records = {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}
    for group in doc["groups"]:
        seen: set[str] = set()
        for rule in group["rules"]:
            used = {name for name in records if name in rule["expr"]}
            assert used <= seen, f"{rule.get('alert') or rule.get('record')}: {sorted(used - seen)}"
            if "record" in rule:
                seen.add(rule["record"])
