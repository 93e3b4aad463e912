"""Pure run-policy decisions: which failures restart the gang, backoff, deadlines, TTL, timestamps.

Exit codes: the container's exit code is torchrun's. torchrun exits 1 whenever a worker fails,
whatever the worker's own code, so a trainer that knows better can say so in its termination
message (`/dev/termination-log`) as a line `shardwise.dev/exit-code=N`; that code then wins, and a
line `shardwise.dev/reason=InvalidModel` (any CamelCase word) names the reason the job fails with,
and `shardwise.dev/retryable=true|false` says whether a new attempt can help (a lost peer can be
retried, an out-of-memory on the same layout cannot); runPolicy's exit-code lists still win. After
an out-of-memory the trainer adds `shardwise.dev/gpu-memory-needed-bytes=N` (its measured peak
plus the allocation that failed), the floor of the operator's re-plan (oom_replan.py).
Defaults follow the usual batch convention: 1–127 are the program's own errors (permanent),
128+ are signals (retryable: OOM kills, SIGTERM from a drained node, watchdog timeouts); a pod
that failed without a container exit code (evicted, its node lost) is retryable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

from shardwise.podstate import PodFailure

Verdict = Literal["permanent", "retryable", "disruption"]
_TRAINER_CODE: Final = re.compile(r"shardwise\.dev/exit-code=(\d{1,3})")
_TRAINER_REASON: Final = re.compile(r"shardwise\.dev/reason=([A-Z][A-Za-z0-9]{0,63})")
_TRAINER_RETRYABLE: Final = re.compile(r"shardwise\.dev/retryable=(true|false)")
_TRAINER_MEMORY: Final = re.compile(r"shardwise\.dev/gpu-memory-needed-bytes=(\d{1,20})")
_TRAINER_LINES: Final = (
    "shardwise.dev/exit-code=",
    "shardwise.dev/reason=",
    "shardwise.dev/retryable=",
    "shardwise.dev/gpu-memory-needed-bytes=",
)
TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"


def parse_time(value: str) -> datetime:
    return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=UTC)


def format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime(TIME_FORMAT)


def add_seconds(value: str, seconds: float) -> str:
    return format_time(parse_time(value) + timedelta(seconds=seconds))


def seconds_between(start: str, end: str) -> float:
    return (parse_time(end) - parse_time(start)).total_seconds()


@dataclass(frozen=True)
class FailureVerdict:
    """How one failed pod is handled, and the code that decided it."""

    verdict: Verdict
    exit_code: int | None
    why: str


def effective_exit_code(failure: PodFailure) -> int | None:
    """The trainer's own code from the termination message if it left one, else the container's."""
    match = _TRAINER_CODE.search(failure.message or "")
    return int(match.group(1)) if match else failure.exit_code


def trainer_reason(failure: PodFailure) -> tuple[str, str] | None:
    """(CamelCase reason, the message lines) the trainer left in its termination message, e.g.
    ("InvalidModel", "--hf-model /models/x: no weight files …"); None when it left none."""
    text = failure.message or ""
    match = _TRAINER_REASON.search(text)
    if not match:
        return None
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith(_TRAINER_LINES)
    ]
    return match.group(1), " ".join(lines)


def trainer_retryable(failure: PodFailure) -> bool | None:
    """The trainer's word on whether another attempt can help (None when it said nothing)."""
    match = _TRAINER_RETRYABLE.search(failure.message or "")
    return None if match is None else match.group(1) == "true"


def trainer_gpu_memory_needed(failure: PodFailure) -> int | None:
    """Bytes per GPU an out-of-memory attempt needed at least, as the trainer measured them."""
    match = _TRAINER_MEMORY.search(failure.message or "")
    return int(match.group(1)) if match else None


def classify(failure: PodFailure, run_policy: dict[str, Any]) -> FailureVerdict:
    """Permanent fails the job now; retryable spends a restart; a disruption restarts for free."""
    if failure.disrupted:
        return FailureVerdict("disruption", failure.exit_code, "the pod was disrupted (DisruptionTarget)")
    code = effective_exit_code(failure)
    if code is None:
        return FailureVerdict("retryable", None, f"the pod failed without an exit code ({failure.reason})")
    permanent = set(run_policy.get("permanentExitCodes") or [])
    retryable = set(run_policy.get("retryableExitCodes") or [])
    if code in permanent:
        return FailureVerdict("permanent", code, f"exit code {code} is in runPolicy.permanentExitCodes")
    if code in retryable:
        return FailureVerdict("retryable", code, f"exit code {code} is in runPolicy.retryableExitCodes")
    told = trainer_retryable(failure)
    if told is not None:
        named = trainer_reason(failure)
        what = named[0] if named else f"exit code {code}"
        if told:
            return FailureVerdict(
                "retryable", code, f"the trainer reports {what}, which a new attempt may not meet"
            )
        return FailureVerdict(
            "permanent", code, f"the trainer reports {what}, which a new attempt would meet again"
        )
    if code >= 128:
        return FailureVerdict(
            "retryable", code, f"exit code {code} (signal {code - 128}) is retryable by default"
        )
    return FailureVerdict("permanent", code, f"exit code {code} is a program error (1-127) by default")


def worst(verdicts: list[FailureVerdict]) -> FailureVerdict:
    """A permanent failure anywhere decides; otherwise a real failure outranks a disruption."""
    order = {"permanent": 0, "retryable": 1, "disruption": 2}
    return min(verdicts, key=lambda v: order[v.verdict])


def backoff_seconds(count: int, base: float, cap: float = 300.0) -> float:
    """Exponential: base, 2·base, 4·base … capped; count is the number of failures so far (≥ 1)."""
    return float(min(cap, base * 2 ** max(0, count - 1)))


def jittered(delay: float, draw: float, cap: float = 300.0) -> float:
    """A delay spread over [delay/2, 3·delay/2) by draw (uniform in [0, 1)), capped: retries of
    many jobs refused at once (a full quota) do not come back in lockstep."""
    return float(min(cap, delay * (0.5 + min(max(draw, 0.0), 1.0))))


def deadline_passed(run_policy: dict[str, Any], start_time: str | None, now: str) -> bool:
    """activeDeadlineSeconds counts from the job's start (status.startTime), restarts included."""
    limit = int(run_policy.get("activeDeadlineSeconds") or 0)
    return bool(limit and start_time and seconds_between(start_time, now) >= limit)


def ttl_remaining(run_policy: dict[str, Any], completion_time: str | None, now: str) -> float | None:
    """Seconds until a finished job is deleted; None when it has no TTL (kept forever)."""
    ttl = run_policy.get("ttlSecondsAfterFinished")
    if ttl is None or completion_time is None:
        return None
    return max(0.0, float(ttl) - seconds_between(completion_time, now))
