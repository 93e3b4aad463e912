"""Pure derivation of a job's status from its plan and its pods, plus the Events each change deserves."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shardwise.conditions import get_condition, set_condition
from shardwise.podstate import PodsSummary

PLANNED = "Planned"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"

# Conditions whose flips the user should hear about, with the Event type for True / False.
_EVENT_TYPES: dict[str, tuple[str, str]] = {
    PLANNED: ("Normal", "Warning"),
    RUNNING: ("Normal", "Normal"),
    SUCCEEDED: ("Normal", "Normal"),
    FAILED: ("Warning", "Normal"),
    SUSPENDED: ("Normal", "Normal"),
    "StragglerDetected": ("Warning", "Normal"),
    "MemoryImbalanced": ("Warning", "Normal"),
    "Replanned": ("Warning", "Normal"),
}


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the job."""

    type: str
    reason: str
    message: str


@dataclass
class StatusUpdate:
    """The status a pass computed and the Events its changes call for."""

    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)


def finished(status: dict[str, Any]) -> bool:
    """Succeeded or Failed: terminal, the operator does nothing more for the job."""
    conditions = status.get("conditions") or []
    return any(c.get("type") in (SUCCEEDED, FAILED) and c.get("status") == "True" for c in conditions)


def planned_generation(status: dict[str, Any]) -> int | None:
    """The spec generation the recorded layout was planned for (None: no layout planned)."""
    planned = get_condition(status.get("conditions") or [], PLANNED)
    if not status.get("layout") or planned is None or planned.get("status") != "True":
        return None
    generation = planned.get("observedGeneration")
    return int(generation) if generation is not None else None


def needs_plan(status: dict[str, Any], generation: int, *, attempt_started: bool) -> bool:
    """Plan now? When no layout is planned, or when an attempt is about to start (none of its
    pods exist yet) and the spec changed since the layout was planned: a resized or retuned job
    starts its next attempt on a plan of its current spec. A running attempt keeps its plan."""
    planned = planned_generation(status)
    if planned is None:
        return True
    return not attempt_started and planned != generation


def status_patch(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch from one status to the next: removed fields are sent as null."""
    patch: dict[str, Any] = {key: None for key in before if key not in after}
    patch.update(after)
    return patch


def changed_events(before: dict[str, Any], after: dict[str, Any]) -> list[Event]:
    """One Event per condition whose status or reason changed between two statuses."""
    events: list[Event] = []
    old = before.get("conditions") or []
    for cond in after.get("conditions") or []:
        ctype = cond.get("type", "")
        prev = get_condition(old, ctype)
        if prev and prev.get("status") == cond.get("status") and prev.get("reason") == cond.get("reason"):
            continue
        if prev is None and cond.get("status") == "False" and ctype != PLANNED:
            continue  # a condition appearing as False is not news (Running=False before start)
        kinds = _EVENT_TYPES.get(ctype, ("Normal", "Warning"))
        etype = kinds[0] if cond.get("status") == "True" else kinds[1]
        events.append(Event(etype, str(cond.get("reason")), str(cond.get("message"))))
    return events


def with_plan_failure(
    status: dict[str, Any], reason: str, message: str, *, now: str, generation: int
) -> dict[str, Any]:
    """Planned=False: the job waits (no pods) until the inventory or the spec changes."""
    new = copy.deepcopy(status)
    new["conditions"] = set_condition(
        new.get("conditions") or [], PLANNED, False, reason, message, now=now, generation=generation
    )
    new["phase"] = "Pending"
    new["message"] = message
    new["observedGeneration"] = generation
    return new


def with_plan(
    status: dict[str, Any], layout: dict[str, Any], message: str, *, now: str, generation: int
) -> dict[str, Any]:
    """Planned=True with the layout recorded in status.layout."""
    new = copy.deepcopy(status)
    new["layout"] = layout
    new["conditions"] = set_condition(
        new.get("conditions") or [], PLANNED, True, "LayoutPlanned", message, now=now, generation=generation
    )
    new["observedGeneration"] = generation
    return new


def _describe_failure(summary: PodsSummary) -> tuple[str, str]:
    first = summary.failures[0]
    where = f" on node {first.node}" if first.node else ""
    code = f" exited with code {first.exit_code}" if first.exit_code is not None else " failed"
    detail = f" ({first.reason}{': ' + first.message if first.message else ''})"
    others = f"; {len(summary.failures) - 1} more pod(s) failed" if len(summary.failures) > 1 else ""
    reason = "PodFailed" if first.exit_code is None else "TrainerExitedWithError"
    return reason, f"pod {first.pod}{where}{code}{detail}{others}"


def with_pods(status: dict[str, Any], summary: PodsSummary, *, now: str, generation: int) -> dict[str, Any]:
    """Phase and Running / Succeeded / Failed conditions from the pods of the current attempt."""
    new = copy.deepcopy(status)
    conds = new.get("conditions") or []
    new["observedGeneration"] = generation
    new.setdefault("startTime", now)

    def cond(ctype: str, value: bool, reason: str, message: str) -> None:
        nonlocal conds
        conds = set_condition(conds, ctype, value, reason, message, now=now, generation=generation)

    if summary.failures:
        reason, message = _describe_failure(summary)
        cond(RUNNING, False, reason, message)
        cond(FAILED, True, reason, message)
        new["phase"] = "Failed"
        new["message"] = message[:32000]
        new.setdefault("completionTime", now)
    elif summary.all_succeeded:
        message = f"all {summary.expected} pods completed successfully"
        if summary.output_path:
            new["outputPath"] = summary.output_path
            message += f"; the result is saved in {summary.output_path}"
        cond(RUNNING, False, "Completed", message)
        cond(SUCCEEDED, True, "AllPodsSucceeded", message)
        new["phase"] = "Succeeded"
        new["message"] = message
        new.setdefault("completionTime", now)
    elif summary.running and len(summary.running) + len(summary.succeeded) == summary.expected:
        # Some ranks may finish a little earlier than others: the job is still running.
        message = f"{len(summary.running)} of {summary.expected} pods running"
        cond(RUNNING, True, "AllPodsRunning", message)
        new["phase"] = "Running"
        new["message"] = message
    else:
        waiting = summary.unschedulable or summary.pending
        if summary.unschedulable:
            reason = "Unschedulable"
            message = f"pods {', '.join(summary.unschedulable)} cannot be scheduled"
            if summary.scheduler_message:
                message += f": {summary.scheduler_message}"
        else:
            reason = "PodsStarting"
            message = (
                f"{len(summary.running)} of {summary.expected} pods running; waiting for "
                f"{', '.join(waiting) if waiting else 'pods to be created'}"
            )
        cond(RUNNING, False, reason, message)
        new["phase"] = "Starting"
        new["message"] = message
    new["conditions"] = conds
    return new


def layout_name(layout: dict[str, Any]) -> str:
    """``tp1-pp1-dp2-zero2``: the shards a checkpoint was written in (status.latestCheckpoint.layout)."""
    return "tp{}-pp{}-dp{}-zero{}".format(
        layout.get("tensor", 1), layout.get("pipeline", 1), layout.get("data", 1), layout.get("zeroStage", 0)
    )


def checkpoint_shards(status: dict[str, Any]) -> tuple[int, int] | None:
    """(tp, pp) of status.latestCheckpoint.layout (``tp2-pp1-dp4-zero1``), None without one."""
    name = str((status.get("latestCheckpoint") or {}).get("layout") or "")
    parts = dict((p[:2], p[2:]) for p in name.split("-") if p[:2] in ("tp", "pp"))
    try:
        return int(parts["tp"]), int(parts["pp"])
    except (KeyError, ValueError):
        return None


def with_checkpoint(
    status: dict[str, Any], found: tuple[int, float] | None, *, attempt: int
) -> dict[str, Any]:
    """status.latestCheckpoint from the scraped trainer stats ``(step, unix time)``: only moves
    forward (a restarted attempt reports nothing until its first save), names the trainer's tag
    (``step<N>`` under the checkpoint directory, which the next attempt resumes by itself) and the
    layout of the attempt that wrote it."""
    if found is None:
        return status
    step, when = found
    current = status.get("latestCheckpoint") or {}
    if int(current.get("step", -1)) >= step:
        return status
    new = copy.deepcopy(status)
    new["latestCheckpoint"] = {
        "step": step,
        "time": datetime.fromtimestamp(when, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "path": f"step{step}",
        "layout": layout_name(status.get("layout") or {}),
        "attempt": attempt,
    }
    return new
