"""Pure summary of a job's pods for one attempt: who is pending, running, done or failed, and why."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

from shardwise.resources.names import LABEL_ATTEMPT, LABEL_NODE_RANK

#: The line a trainer that saved its result leaves in its termination message (the trainer's
#: contract.TERMINATION_OUTPUT; tests/unit/test_capabilities.py holds the two equal).
_TRAINER_OUTPUT: Final = re.compile(r"^shardwise\.dev/output=(\S.{0,4000})$", re.MULTILINE)


@dataclass(frozen=True)
class PodFailure:
    """One failed pod: its name, node, exit code (None when it never ran) and the reason."""

    pod: str
    node: str | None
    exit_code: int | None
    reason: str
    message: str
    disrupted: bool = False  # DisruptionTarget: evicted, preempted, node drained


@dataclass(frozen=True)
class PodsSummary:
    """Where the pods of the current attempt stand."""

    expected: int
    present: frozenset[int]
    pending: tuple[str, ...] = ()
    unschedulable: tuple[str, ...] = ()
    running: tuple[str, ...] = ()
    succeeded: tuple[str, ...] = ()
    failures: tuple[PodFailure, ...] = ()
    stale: tuple[str, ...] = field(default=())  # pods of other attempts
    scheduler_message: str = ""  # the scheduler's word on the first unschedulable pod
    nodes: tuple[tuple[str, str], ...] = ()  # (pod, node) of every scheduled live pod
    disrupted: tuple[str, ...] = ()  # live pods marked DisruptionTarget (about to be evicted)
    first_created: str | None = None  # earliest creationTimestamp of the attempt's pods
    output_path: str | None = None  # where the trainer of a succeeded pod saved the result

    @property
    def missing(self) -> list[int]:
        return [rank for rank in range(self.expected) if rank not in self.present]

    @property
    def all_running(self) -> bool:
        return len(self.running) == self.expected and not self.failures

    @property
    def all_succeeded(self) -> bool:
        return len(self.succeeded) == self.expected


def _failure(pod: dict[str, Any]) -> PodFailure:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    exit_code: int | None = None
    reason = status.get("reason") or "Failed"
    message = status.get("message") or ""
    for cs in status.get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated")
        if terminated and terminated.get("exitCode", 0) != 0:
            exit_code = int(terminated["exitCode"])
            reason = terminated.get("reason") or reason
            message = terminated.get("message") or message
            break
    return PodFailure(
        pod=str(meta.get("name")),
        node=(pod.get("spec") or {}).get("nodeName"),
        exit_code=exit_code,
        reason=str(reason),
        message=str(message),
        disrupted=_disruption_target(pod),
    )


def trainer_output(pod: dict[str, Any]) -> str | None:
    """The path a succeeded pod's trainer saved its result to, from its termination message."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated") or {}
        match = _TRAINER_OUTPUT.search(str(terminated.get("message") or ""))
        if match:
            return match.group(1).rstrip()
    return None


def _disruption_target(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def _unschedulable(pod: dict[str, Any]) -> str | None:
    """The scheduler's message when the pod was found unschedulable, else None."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
            return str(cond.get("message") or "unschedulable")
    return None


def summarize(pods: list[dict[str, Any]], *, expected: int, attempt: int) -> PodsSummary:
    """Classify the job's pods; pods of another attempt are listed as stale, not counted."""
    present: set[int] = set()
    pending: list[str] = []
    unschedulable: list[str] = []
    running: list[str] = []
    succeeded: list[str] = []
    failures: list[PodFailure] = []
    stale: list[str] = []
    scheduler_message = ""
    nodes: list[tuple[str, str]] = []
    disrupted: list[str] = []
    created: list[str] = []
    output_path: str | None = None
    for pod in sorted(pods, key=lambda p: str((p.get("metadata") or {}).get("name"))):
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        name = str(meta.get("name"))
        if labels.get(LABEL_ATTEMPT) != str(attempt) or meta.get("deletionTimestamp"):
            stale.append(name)
            continue
        try:
            present.add(int(labels.get(LABEL_NODE_RANK, "-1")))
        except ValueError:
            stale.append(name)
            continue
        phase = (pod.get("status") or {}).get("phase") or "Pending"
        if meta.get("creationTimestamp"):
            created.append(str(meta["creationTimestamp"]))
        node_name = (pod.get("spec") or {}).get("nodeName")
        if node_name and phase in ("Pending", "Running"):
            nodes.append((name, str(node_name)))
            if _disruption_target(pod):
                disrupted.append(name)
        if phase == "Running":
            running.append(name)
        elif phase == "Succeeded":
            succeeded.append(name)
            output_path = output_path or trainer_output(pod)
        elif phase == "Failed":
            failures.append(_failure(pod))
        else:
            pending.append(name)
            why = _unschedulable(pod)
            if why is not None:
                unschedulable.append(name)
                scheduler_message = scheduler_message or why
    return PodsSummary(
        expected=expected,
        present=frozenset(present),
        pending=tuple(pending),
        unschedulable=tuple(unschedulable),
        running=tuple(running),
        succeeded=tuple(succeeded),
        failures=tuple(failures),
        stale=tuple(stale),
        scheduler_message=scheduler_message,
        nodes=tuple(nodes),
        disrupted=tuple(disrupted),
        first_created=min(created) if created else None,
        output_path=output_path,
    )
