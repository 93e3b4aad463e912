"""Pure glue from a job spec and the node shape it got to a plan: the layout document or why not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardwise.inventory import Shape


@dataclass(frozen=True)
class PlanOutcome:
    """Either a layout document (feasible) or a CamelCase reason and a message with the numbers."""

    feasible: bool
    reason: str
    message: str
    document: dict[str, Any] | None = None
    layout_status: dict[str, Any] | None = None


def plan_job(spec: dict[str, Any], shape: Shape, pins: dict[str, Any] | None = None) -> PlanOutcome:
    """Plan the job on the given shape; pins (a previous status.layout) reproduce an earlier plan."""
    raise NotImplementedError
