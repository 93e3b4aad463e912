"""stragglerPolicy Replace decisions: which node a straggler finding excludes, and when not."""

from __future__ import annotations

from typing import Any

import pytest

from shardwise.metrics.condition_values import MEMORY_IMBALANCED, STRAGGLER_DETECTED, ConditionValue
from shardwise.remediation import Replacement, decide, excluded_names, with_excluded

SLOW_B = ConditionValue(STRAGGLER_DETECTED, True, "StragglerFound", "1 straggler(s) on node(s) b", ("b",))
CLEAR = ConditionValue(STRAGGLER_DETECTED, False, "NoStragglers", "none", ())
UNEVEN = ConditionValue(MEMORY_IMBALANCED, True, "MemoryImbalanced", "uneven", ("b",))
REPLACE = {"stragglerPolicy": "Replace"}


@pytest.mark.parametrize(
    ("monitoring", "findings", "status", "running_on", "expected"),
    [
        pytest.param({}, [SLOW_B], {}, ["a", "b"], Replacement(), id="default policy only reports"),
        pytest.param({"stragglerPolicy": "Report"}, [SLOW_B], {}, ["a", "b"], Replacement(), id="report"),
        pytest.param(REPLACE, [SLOW_B], {}, ["a", "b"], Replacement(nodes=("b",)), id="replace"),
        pytest.param(REPLACE, [CLEAR, UNEVEN], {}, ["a", "b"], Replacement(), id="no straggler"),
        # A finding of the attempt that went names a node the new pods left.
        pytest.param(REPLACE, [SLOW_B], {}, ["a", "c"], Replacement(), id="stale finding"),
        pytest.param(
            REPLACE, [SLOW_B], {"excludedNodes": [{"name": "b", "reason": "Straggler"}]}, ["a", "b"],
            Replacement(), id="already excluded",
        ),
        pytest.param(
            REPLACE, [SLOW_B], {"stragglerReplacements": 1}, ["a", "b"],
            Replacement(refused="stragglerPolicy Replace: the budget of 1 replacement(s) is spent "
                        "(maxStragglerReplacements), the node stays"),
            id="budget spent",
        ),
        pytest.param(
            {**REPLACE, "maxStragglerReplacements": 3}, [SLOW_B], {"stragglerReplacements": 2}, ["b"],
            Replacement(nodes=("b",)), id="budget left",
        ),
        pytest.param(
            {**REPLACE, "maxStragglerReplacements": 0}, [SLOW_B], {}, ["b"],
            Replacement(refused="stragglerPolicy Replace: the budget of 0 replacement(s) is spent "
                        "(maxStragglerReplacements), the node stays"),
            id="budget zero",
        ),
    ],
)  # fmt: skip
def test_decide(
    monitoring: dict[str, Any],
    findings: list[ConditionValue],
    status: dict[str, Any],
    running_on: list[str],
    expected: Replacement,
) -> None:
    assert decide(monitoring, findings, status, running_on) == expected


def test_with_excluded_appends_counts_and_keeps_the_schema_bound() -> None:
    status: dict[str, Any] = {"excludedNodes": [{"name": f"n{i}", "reason": "Straggler"} for i in range(64)]}
    new = with_excluded(status, ["b"], reason="Straggler", message="x" * 2000, now="2026-12-07T06:00:00Z")
    assert new["stragglerReplacements"] == 1
    assert len(new["excludedNodes"]) == 64
    assert new["excludedNodes"][-1] == {
        "name": "b", "reason": "Straggler", "message": "x" * 1024, "time": "2026-12-07T06:00:00Z"
    }  # fmt: skip
    assert "b" in excluded_names(new) and "n0" not in excluded_names(new)
    assert len(status["excludedNodes"]) == 64 and "stragglerReplacements" not in status  # not mutated
