"""Pure glue from a job spec and the node shape it got to a plan: the layout document or why not."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from shardwise.inventory import Shape
from shardwise.jobspec import SpecError, pins_from_status_layout, request_from_spec
from shardwise.planner import PlanInputError, PlanRequest, PlanResult, capabilities, gpu, plan
from shardwise.planner.request import PlannerSettings
from shardwise.planner.search import REASON_RUNTIME_PREFIX
from shardwise.planner.units import GIB
from shardwise.resources.layout_file import layout_document_for, status_layout


@dataclass(frozen=True)
class PlanOutcome:
    """Either a layout document (feasible) or a CamelCase reason and a message with the numbers."""

    feasible: bool
    reason: str
    message: str
    document: dict[str, Any] | None = None
    layout_status: dict[str, Any] | None = None


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def _infeasible(result: PlanResult) -> PlanOutcome:
    choice = result.choice
    refused = [r for r in result.rejected if r.reason.startswith(REASON_RUNTIME_PREFIX)]
    if choice is None and refused and result.layouts_considered == 0:
        # Every layout the GPUs allow is one the trainer does not run (capabilities.TABLE).
        return PlanOutcome(False, "UnsupportedByRuntime", "; ".join(r.reason for r in refused[:3]))
    if choice is None:
        message = "no layout satisfies the constraints"
        if result.rejected:
            message += ": " + "; ".join(f"{r.reason} ({r.count})" for r in result.rejected[:3])
        return PlanOutcome(False, "NoValidLayout", message)
    host_only = all("host" in p.lower() or "cpu memory" in p.lower() for p in choice.problems)
    reason = "InsufficientHostMemory" if choice.problems and host_only else "InsufficientGpuMemory"
    parts = [
        f"closest layout {choice.layout.describe()} needs {_gib(choice.memory.total)} per GPU of"
        f" {_gib(choice.capacity)}"
    ]
    if result.diagnosis is not None:
        parts = [result.diagnosis.message]
        ways = [w.description for w in result.diagnosis.ways_out[:4]]
        if ways:
            parts.append("ways out: " + "; ".join(ways))
    elif choice.problems:
        parts.append("; ".join(choice.problems[:3]))
    return PlanOutcome(False, reason, ". ".join(parts))


def _held_to(request: PlanRequest, shards: tuple[int, int] | None) -> list[PlanRequest] | None:
    """The request pinned, one alternative each, to what a checkpoint written at ``shards`` (tp, pp)
    must keep to resume (capabilities.resume_held), leaving out the alternatives the spec's own
    pins contradict (the user changed them); None without a checkpoint."""
    if shards is None:
        return None
    pins = request.pins
    held = []
    for tp, pp in capabilities.resume_held(*shards):
        if (tp is not None and pins.tp not in (None, tp)) or (pp is not None and pins.pp not in (None, pp)):
            continue
        pinned = dataclasses.replace(pins, tp=pins.tp if tp is None else tp, pp=pins.pp if pp is None else pp)
        held.append(dataclasses.replace(request, pins=pinned))
    return held or None


def _held_text(shards: tuple[int, int]) -> str:
    def one(tp: int | None, pp: int | None) -> str:
        return ", ".join(f"{k}={v}" for k, v in (("tp", tp), ("pp", pp)) if v is not None)

    return " or ".join(one(tp, pp) for tp, pp in capabilities.resume_held(*shards))


def _plan_held(kept: list[PlanRequest] | None) -> PlanResult | str:
    """The first feasible plan of the alternatives held to the checkpoint, else the first one's
    result (or why its pins cannot be planned at all)."""
    if not kept:
        return "no checkpoint"
    first: PlanResult | str | None = None
    for request in kept:
        try:
            result: PlanResult | str = plan(request)
        except PlanInputError as exc:
            result = str(exc)
        if isinstance(result, PlanResult) and result.feasible:
            return result
        first = result if first is None else first
    assert first is not None
    return first


def _not_resumable(shards: tuple[int, int], held: PlanOutcome, free: PlanResult) -> PlanOutcome:
    assert free.choice is not None
    tp, pp = shards
    return PlanOutcome(
        False,
        "CheckpointNotResumable",
        f"the latest checkpoint was written at tp={tp}, pp={pp}, and no layout with {_held_text(shards)}"
        f" fits what is left ({held.reason}: {held.message}); the trainer converts checkpoints across"
        " DP size, ZeRO stage, TP size without pipeline parallelism and pipeline depth without tensor"
        f" parallelism, so the job waits for GPUs that fit it. {free.choice.layout.describe()} would"
        " fit, from step 0: move the checkpoint directory away (spec.checkpoint) to start over",
    )


def plan_job(
    spec: dict[str, Any],
    shape: Shape,
    pins: dict[str, Any] | None = None,
    *,
    memory_correction: float = 1.0,
    checkpoint_shards: tuple[int, int] | None = None,
) -> PlanOutcome:
    """Plan the job on the given shape; pins (a previous status.layout) reproduce an earlier plan;
    memory_correction (status.memoryCorrection.factor) scales the memory predictions;
    checkpoint_shards, the (tp, pp) of the job's latest checkpoint, holds a re-plan to what the
    trainer can convert it to (capabilities.resume_held: TP or PP may change, not both, the other
    at 1), and a re-plan that could only run elsewhere is refused (CheckpointNotResumable) rather
    than losing the progress.

    The GPU is the shape's product (GFD label) with its labelled memory; spec.resources.gpuMemory,
    when given, overrides the label, as the CLI's --gpu-memory does.
    """
    resources = spec.get("resources") or {}
    try:
        memory = shape.gpu_memory_bytes
        if resources.get("gpuMemory") is None and memory is None and shape.product == "unknown":
            return PlanOutcome(
                False,
                "UnknownGpuMemory",
                "the chosen nodes carry no nvidia.com/gpu.product / nvidia.com/gpu.memory labels; "
                "install GPU Feature Discovery or set spec.resources.gpuMemory",
            )
        # With spec.resources.gpuMemory the spec decides (jobspec reads gpuProduct + gpuMemory).
        gpu_spec = (
            None
            if resources.get("gpuMemory") is not None
            else gpu(None if shape.product == "unknown" else shape.product, memory)
        )
        request = request_from_spec(
            spec,
            nodes=shape.nodes,
            gpus_per_node=shape.gpus_per_node,
            gpu=gpu_spec,
            node_memory_bytes=None if resources.get("nodeMemory") else shape.host_memory_bytes,
            settings=PlannerSettings(memory_correction=memory_correction),
        )
        if pins:
            request = dataclasses.replace(request, pins=pins_from_status_layout(pins))
        kept = None if pins else _held_to(request, checkpoint_shards)
        held = _plan_held(kept)
        if isinstance(held, PlanResult) and held.feasible:
            result = held
        else:
            result = plan(request)
            if kept is not None and checkpoint_shards is not None and result.feasible:
                why = (
                    _infeasible(held)
                    if isinstance(held, PlanResult)
                    else PlanOutcome(False, "InvalidSpec", held)
                )
                return _not_resumable(checkpoint_shards, why, result)
    except SpecError as exc:
        return PlanOutcome(False, "InvalidSpec", str(exc))
    except PlanInputError as exc:
        return PlanOutcome(False, "InvalidSpec", str(exc))
    except Exception as exc:  # a planner bug must reach the user as a condition, not loop silently
        return PlanOutcome(
            False,
            "PlannerError",
            f"the planner failed on this spec ({type(exc).__name__}: {exc}); please report it",
        )
    if not result.feasible or result.choice is None:
        return _infeasible(result)
    document = layout_document_for(result)
    status = status_layout(result.choice)
    if shape.product != "unknown":  # the pods are held to the GPU product the plan assumed
        status["gpuProduct"] = shape.product
    message = (
        f"{result.choice.layout.describe()} on {shape.nodes}×{shape.gpus_per_node} {shape.product};"
        f" predicted {_gib(result.choice.memory.total)} of {_gib(result.choice.capacity)} per GPU,"
        f" step {result.choice.step_time.total:.2f}s"
    )
    return PlanOutcome(True, "LayoutPlanned", message, document, status)
