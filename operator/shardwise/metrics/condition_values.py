"""Status condition values the analysis yields, and the wording helpers of their messages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

STRAGGLER_DETECTED = "StragglerDetected"
MEMORY_IMBALANCED = "MemoryImbalanced"
REASON_STRAGGLER_FOUND = "StragglerFound"
REASON_NO_STRAGGLERS = "NoStragglers"
REASON_MEMORY_IMBALANCED = "MemoryImbalanced"
REASON_MEMORY_BALANCED = "MemoryBalanced"
REASON_INSUFFICIENT_DATA = "InsufficientData"

#: At most this many ranks / stages are named in one condition message (the rest are counted).
MAX_NAMED = 8


@dataclass(frozen=True, slots=True)
class ConditionValue:
    """A status condition to set (``shardwise.conditions.set_condition`` takes these fields)."""

    type: str
    status: bool
    reason: str
    message: str
    #: The nodes the finding is about (a straggler's), for stragglerPolicy Replace.
    nodes: tuple[str, ...] = ()


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def pct(value: float) -> str:
    return f"{value * 100:.1f} %"


def named(items: Sequence[str]) -> str:
    shown = "; ".join(items[:MAX_NAMED])
    rest = len(items) - MAX_NAMED
    return shown + (f"; and {rest} more" if rest > 0 else "")
