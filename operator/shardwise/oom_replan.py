"""Pure out-of-memory re-plan: the memory correction a failed attempt implies, and its status record."""

from __future__ import annotations

from math import ceil
from typing import Any, Final

REPLANNED: Final = "Replanned"
REASON_OOM_REPLAN: Final = "OutOfMemoryReplan"
REASON_GPU_OOM: Final = "GpuOutOfMemory"
# PlannerSettings.memory_correction's bounds.
MAX_CORRECTION: Final = 100.0


def correction_factor(predicted: int, capacity: int, needed: int | None) -> float:
    """Measured / predicted per-GPU bytes of a layout that ran out of memory.

    The attempt needed more than the GPU has (it ran out), so its need is at least capacity + 1
    byte even when the trainer measured no GPU peak (a CPU run, an allocator that died first); a
    measured need above that is the floor instead. Rounded up, so predicted x factor stays above
    the GPU's memory: the failed layout never fits again.
    """
    if predicted <= 0 or capacity <= 0:
        raise ValueError(f"predicted and capacity must be positive, got {predicted}, {capacity}")
    floor = max(needed or 0, capacity + 1)
    return min(MAX_CORRECTION, max(1.0, ceil(floor / predicted * 1000) / 1000))


def describe(layout: dict[str, Any]) -> str:
    """A status.layout in one phrase, with the knobs an out-of-memory re-plan may turn."""
    return (
        f"{layout.get('summary', '?')} micro-batch {layout.get('microBatchSize', '?')}"
        f" checkpointing {layout.get('activationCheckpointing', '?')} offload {layout.get('offload', '?')}"
    )


def correction_record(layout: dict[str, Any], needed: int | None, attempt: int) -> dict[str, Any] | None:
    """status.memoryCorrection for an out-of-memory of ``layout`` (a status.layout); None when the
    layout carries no prediction to correct (planned by an older operator)."""
    predicted = int(layout.get("predictedGpuMemoryBytes") or 0)
    capacity = int(layout.get("gpuMemoryBytes") or 0)
    if predicted <= 0 or capacity <= 0:
        return None
    record: dict[str, Any] = {
        "factor": correction_factor(predicted, capacity, needed),
        "predictedBytes": predicted,
        "gpuMemoryBytes": capacity,
        "layout": describe(layout)[:200],
        "attempt": attempt,
    }
    if needed is not None:
        record["neededBytes"] = needed
    return record


def current_correction(status: dict[str, Any]) -> float:
    """The correction every plan of this job applies (1.0 before any out-of-memory)."""
    return float((status.get("memoryCorrection") or {}).get("factor") or 1.0)


def may_replan(status: dict[str, Any]) -> bool:
    """One out-of-memory re-plan per job: a second out-of-memory fails it."""
    return not status.get("memoryCorrection")


def replan_message(where: str, record: dict[str, Any], new_layout: dict[str, Any]) -> str:
    needed = record.get("neededBytes")
    measured = f"needed at least {needed / 2**30:.2f} GiB, " if needed else ""
    return (
        f"{where}; {measured}predicted {record['predictedBytes'] / 2**30:.2f} GiB: re-planned with "
        f"predictions x{record['factor']:.3f}: {record['layout']} → {describe(new_layout)}"
    )


def infeasible_message(where: str, record: dict[str, Any], reason: str, diagnosis: str) -> str:
    return (
        f"{where}; with predictions x{record['factor']:.3f} (the measured peak of {record['layout']})"
        f" nothing fits ({reason}): {diagnosis}"
    )
