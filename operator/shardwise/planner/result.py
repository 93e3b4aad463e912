"""Planner outputs: an evaluated layout, rejection summaries, the diagnosis, the PlanResult JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardwise.planner.cost import StepTime
from shardwise.planner.layout import Layout
from shardwise.planner.memory import MemoryBreakdown
from shardwise.planner.request import PlanRequest


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One layout with its per-stage memory (bytes per GPU), host memory and step time."""

    layout: Layout
    per_stage: tuple[MemoryBreakdown, ...]
    stage_layers: tuple[tuple[int, int], ...]
    capacity: int
    cpu_memory_per_node: int
    step_time: StepTime
    problems: tuple[str, ...]  # empty when the layout fits

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def worst_stage(self) -> int:
        totals = [m.total for m in self.per_stage]
        return totals.index(max(totals))

    @property
    def memory(self) -> MemoryBreakdown:
        """The worst pipeline stage's breakdown (what the JSON "memory_per_gpu" reports)."""
        return self.per_stage[self.worst_stage]

    @property
    def shortfall(self) -> int:
        """Bytes per GPU over capacity on the worst stage (<= 0 when it fits on the GPU)."""
        return self.memory.total - self.capacity

    def summary(self) -> dict[str, Any]:
        """Compact form used for "alternatives"."""
        return {
            "layout": self.layout.to_dict(),
            "memory_per_gpu_total": self.memory.total,
            "step_time_seconds": self.step_time.total,
        }


@dataclass(frozen=True, slots=True)
class Rejection:
    """A group of rejected layouts sharing one reason, with the closest one as an example."""

    reason: str
    count: int
    example: Layout | None = None
    shortfall_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "count": self.count,
            "example": self.example.to_dict() if self.example else None,
            "shortfall_bytes": self.shortfall_bytes,
        }


@dataclass(frozen=True, slots=True)
class WayOut:
    """One concrete change that makes the request fit, with the plan it leads to."""

    kind: str  # more_gpus | lora | qlora | offload | shorter_sequence
    description: str
    cost_gpu_seconds_per_million_tokens: float
    layout: Layout
    memory_per_gpu_total: int
    details: tuple[tuple[str, int | float | str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "description": self.description,
            "cost_gpu_seconds_per_million_tokens": self.cost_gpu_seconds_per_million_tokens,
            "layout": self.layout.to_dict(),
            "memory_per_gpu_total": self.memory_per_gpu_total,
            **dict(self.details),
        }


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """Why nothing fits: the smallest shortfall per GPU and the ways out, cheapest first."""

    shortfall_bytes_per_gpu: int
    message: str
    ways_out: tuple[WayOut, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "shortfall_bytes_per_gpu": self.shortfall_bytes_per_gpu,
            "message": self.message,
            "ways_out": [w.to_dict() for w in self.ways_out],
        }


@dataclass(frozen=True, slots=True)
class PlanResult:
    """plan()'s answer. When infeasible, `choice` is the closest layout (smallest shortfall)."""

    request: PlanRequest
    feasible: bool
    choice: Evaluation | None
    alternatives: tuple[Evaluation, ...]
    rejected: tuple[Rejection, ...]
    diagnosis: Diagnosis | None
    notes: tuple[str, ...]
    layouts_considered: int
    alternative_reasons: tuple[str, ...] = ()  # one line per alternative: its cost vs the choice

    def to_json(self) -> dict[str, Any]:
        """The `shardwise plan --json` object (issue 2 contract). Infeasible results still carry
        the closest layout and its memory, so the numbers of the shortfall are visible."""
        choice = self.choice
        return {
            "feasible": self.feasible,
            "model": {
                "name": self.request.model.name,
                "parameters": self.request.model.parameters,
            },
            "layout": choice.layout.to_dict() if choice else None,
            "memory_per_gpu": choice.memory.to_dict(choice.capacity) if choice else None,
            "worst_stage": choice.worst_stage if choice else None,
            "cpu_memory_per_node": choice.cpu_memory_per_node if choice else None,
            "step_time_seconds": choice.step_time.total if choice else None,
            "step_time_breakdown": choice.step_time.to_dict() if choice else None,
            "problems": list(choice.problems) if choice else [],
            "alternatives": [
                {**a.summary(), "why_not": why}
                for a, why in zip(
                    self.alternatives, self.alternative_reasons or ("",) * len(self.alternatives), strict=True
                )
            ],
            "rejected": [r.to_dict() for r in self.rejected],
            "diagnosis": self.diagnosis.to_dict() if self.diagnosis else None,
            "notes": list(self.notes),
            "layouts_considered": self.layouts_considered,
        }
