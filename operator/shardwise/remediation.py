"""Pure straggler remediation: under ``stragglerPolicy: Replace``, which node to exclude, or why not."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from shardwise.metrics.condition_values import STRAGGLER_DETECTED, ConditionValue

POLICY_REPORT: Final = "Report"
POLICY_REPLACE: Final = "Replace"
DEFAULT_MAX_REPLACEMENTS: Final = 1
#: status.excludedNodes reason of a node a straggler was found on.
EXCLUDED_STRAGGLER: Final = "Straggler"


@dataclass(frozen=True)
class Replacement:
    """What a pass does about a straggler: exclude ``nodes`` (empty = nothing) and why not, if not."""

    nodes: tuple[str, ...] = ()
    refused: str = ""  # set when Replace would act but may not (budget spent); shown in the condition


def excluded_names(status: Mapping[str, Any]) -> set[str]:
    """The node names in status.excludedNodes."""
    return {str(e.get("name")) for e in status.get("excludedNodes") or [] if e.get("name")}


def replacements_used(status: Mapping[str, Any]) -> int:
    return int(status.get("stragglerReplacements") or 0)


def decide(
    monitoring: Mapping[str, Any],
    findings: Iterable[ConditionValue],
    status: Mapping[str, Any],
    running_on: Sequence[str],
) -> Replacement:
    """Replace acts on a StragglerDetected=True finding naming nodes the current attempt runs on
    (a finding of an earlier attempt names nodes it has left) and not excluded yet, while the
    budget ``maxStragglerReplacements`` lasts."""
    if (monitoring.get("stragglerPolicy") or POLICY_REPORT) != POLICY_REPLACE:
        return Replacement()
    here = set(running_on) - excluded_names(status)
    nodes: set[str] = set()
    for f in findings:
        if f.type == STRAGGLER_DETECTED and f.status:
            nodes |= set(f.nodes) & here
    if not nodes:
        return Replacement()
    limit = int(monitoring.get("maxStragglerReplacements", DEFAULT_MAX_REPLACEMENTS))
    used = replacements_used(status)
    if used >= limit:
        return Replacement(
            refused=(
                f"stragglerPolicy Replace: the budget of {limit} replacement(s) is spent "
                "(maxStragglerReplacements), the node stays"
            )
        )
    return Replacement(nodes=tuple(sorted(nodes)))


def with_excluded(
    status: Mapping[str, Any], nodes: Sequence[str], *, reason: str, message: str, now: str
) -> dict[str, Any]:
    """status with ``nodes`` appended to excludedNodes and one more straggler replacement counted."""
    new = dict(status)
    entries = [dict(e) for e in status.get("excludedNodes") or []]
    entries += [{"name": n, "reason": reason, "message": message[:1024], "time": now} for n in nodes]
    new["excludedNodes"] = entries[-64:]  # the schema's bound; the oldest go first
    new["stragglerReplacements"] = replacements_used(status) + 1
    return new
