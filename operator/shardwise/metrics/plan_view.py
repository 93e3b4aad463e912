"""The parts of a job's ``layout.json`` the analysis reads (docs/layout-contract.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class StagePrediction:
    """``layout.json`` ``predicted.per_stage[i]``: bytes per GPU of one pipeline stage."""

    stage: int
    total_bytes: int
    model_state_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class PlanView:
    """The parts of ``layout.json`` the analysis needs (docs/layout-contract.md)."""

    tp: int
    pp: int
    dp: int
    capacity_bytes: int | None = None
    per_stage: tuple[StagePrediction, ...] = ()
    step_seconds: float | None = None  # the planner's step-time estimate
    model_flops_per_step: float | None = None  # recompute excluded
    gpu: str = ""
    gpu_peak_flops: float | None = None
    mfu: float | None = None  # the MFU the estimate assumed

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def stage_of(self, rank: int) -> int:
        """rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank (contract rank order)."""
        return rank // (self.dp * self.tp)

    def replica_of(self, rank: int) -> int:
        """The data-parallel replica (dp_rank) of a rank."""
        return (rank % (self.dp * self.tp)) // self.tp

    def prediction(self, stage: int) -> StagePrediction | None:
        return next((p for p in self.per_stage if p.stage == stage), None)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def plan_from_layout(layout: Mapping[str, Any]) -> PlanView:
    """A :class:`PlanView` of a ``layout.json`` document (the ``<job>-layout`` ConfigMap)."""
    lay = layout.get("layout") or {}
    predicted = layout.get("predicted") or {}
    stages = tuple(
        StagePrediction(
            stage=int(entry.get("stage", i)),
            total_bytes=int(entry.get("total") or 0),
            model_state_bytes=_opt_int(entry.get("model_state_bytes")),
        )
        for i, entry in enumerate(predicted.get("per_stage") or [])
    )
    return PlanView(
        tp=int(lay.get("tp", 1)),
        pp=int(lay.get("pp", 1)),
        dp=int(lay.get("dp", 1)),
        capacity_bytes=_opt_int(predicted.get("gpu_memory_bytes")),
        per_stage=stages,
        step_seconds=_opt_float(predicted.get("step_time_seconds")),
        model_flops_per_step=_opt_float(predicted.get("model_flops_per_step")),
        gpu=str(predicted.get("gpu") or ""),
        gpu_peak_flops=_opt_float(predicted.get("gpu_peak_flops")),
        mfu=_opt_float(predicted.get("mfu")),
    )
