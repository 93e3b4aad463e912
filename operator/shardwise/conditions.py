"""Pure helpers for status conditions: a list keyed by type, transitions stamped only on change."""

from __future__ import annotations

from typing import Any

Condition = dict[str, Any]


def get_condition(conditions: list[Condition], ctype: str) -> Condition | None:
    """The condition of that type, if present."""
    return next((c for c in conditions if c.get("type") == ctype), None)


def is_true(conditions: list[Condition], ctype: str) -> bool:
    found = get_condition(conditions, ctype)
    return bool(found and found.get("status") == "True")


def set_condition(
    conditions: list[Condition],
    ctype: str,
    status: bool,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int | None = None,
) -> list[Condition]:
    """A new list with the condition set; lastTransitionTime moves only when the status flips.

    Keeping the old timestamp when only the message changes makes the status stable across
    passes, so an unchanged job produces no status patch at all.
    """
    value = "True" if status else "False"
    previous = get_condition(conditions, ctype)
    transition = previous["lastTransitionTime"] if previous and previous.get("status") == value else now
    updated: Condition = {
        "type": ctype,
        "status": value,
        "reason": reason,
        "message": message[:32000],
        "lastTransitionTime": transition,
    }
    if generation is not None:
        updated["observedGeneration"] = generation
    # Replaced in place, new ones appended: order never changes, so an unchanged condition never
    # turns into a status write (meta.SetStatusCondition does the same).
    if previous is None:
        return [*conditions, updated]
    return [updated if c.get("type") == ctype else c for c in conditions]
