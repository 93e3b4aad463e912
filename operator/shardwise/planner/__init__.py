"""Pure layout planner: model shapes, the memory model, the cost model and the layout search."""

from __future__ import annotations

from shardwise.planner import capabilities
from shardwise.planner.architecture import Architecture, ModelSpec, split_layers
from shardwise.planner.choice import choose, explain
from shardwise.planner.diagnosis import diagnose
from shardwise.planner.errors import PlanInputError
from shardwise.planner.gpus import GPUS, GpuSpec, find_gpu, gpu
from shardwise.planner.hf_config import parse_hf_config
from shardwise.planner.layout import Layout
from shardwise.planner.memory import MemoryBreakdown, model_context
from shardwise.planner.presets import PRESETS, preset
from shardwise.planner.request import Cluster, Pins, PlannerSettings, PlanRequest, TrainingSettings
from shardwise.planner.result import Diagnosis, Evaluation, PlanResult, Rejection, WayOut
from shardwise.planner.search import evaluate_with, search, validate

__all__ = [
    "GPUS",
    "PRESETS",
    "Architecture",
    "Cluster",
    "Diagnosis",
    "Evaluation",
    "GpuSpec",
    "Layout",
    "MemoryBreakdown",
    "ModelSpec",
    "Pins",
    "PlanInputError",
    "PlanRequest",
    "PlanResult",
    "PlannerSettings",
    "Rejection",
    "TrainingSettings",
    "WayOut",
    "evaluate",
    "find_gpu",
    "gpu",
    "parse_hf_config",
    "plan",
    "preset",
    "split_layers",
]


def evaluate(request: PlanRequest, layout: Layout) -> Evaluation:
    """Per-stage prediction of one layout (layout.json "predicted"), fitting or not."""
    validate(request)
    return evaluate_with(model_context(request), layout)


def _search_only(request: PlanRequest) -> tuple[bool, Evaluation | None]:
    validate(request)
    ctx = model_context(request)
    outcome = search(ctx, 1)
    for layout in outcome.ranked:
        evaluation = evaluate_with(ctx, layout)
        if evaluation.fits:
            return True, evaluation
    return False, None


def plan(request: PlanRequest) -> PlanResult:
    """Plan a request: the fastest fitting layout, the next best, why the rest failed, and a
    diagnosis when nothing fits. Raises PlanInputError for invalid input (never for a misfit)."""
    validate(request)
    ctx = model_context(request)
    keep = request.settings.alternatives + 1
    outcome = search(ctx, keep)
    # The search works at the worst stages only; re-evaluate every stage exactly before answering.
    fitting = choose([e for e in (evaluate_with(ctx, lay) for lay in outcome.ranked) if e.fits])
    notes = _notes(request)
    if fitting:
        if fitting[0].layout.offload != "none" and request.cluster.node_memory_bytes is None:
            notes += (
                f"host memory per node not given: this layout offloads {fitting[0].cpu_memory_per_node} "
                "bytes per node to CPU memory; set resources.nodeMemory / --node-memory to check it",
            )
        notes += _expert_note(request, fitting[0].layout)
        return PlanResult(
            request=request,
            feasible=True,
            choice=fitting[0],
            alternatives=tuple(fitting[1:]),
            alternative_reasons=tuple(explain(alt, fitting[0]) for alt in fitting[1:]),
            rejected=outcome.rejected,
            diagnosis=None,
            notes=notes,
            layouts_considered=outcome.considered,
        )
    closest = evaluate_with(ctx, outcome.closest) if outcome.closest is not None else None
    return PlanResult(
        request=request,
        feasible=False,
        choice=closest,
        alternatives=(),
        rejected=outcome.rejected,
        diagnosis=diagnose(_search_only, request, closest),
        notes=notes,
        layouts_considered=outcome.considered,
    )


def _expert_note(request: PlanRequest, layout: Layout) -> tuple[str, ...]:
    """A note when the chosen layout splits experts further than the trainer runs (CLI only:
    admission plans with plan_expert_parallel_beyond_runtime off and refuses such a pin)."""
    rows = capabilities.rows(request.training.method, request.training.model_source)
    if layout.ep <= 1 or any(c.max_ep >= layout.ep for c in rows):
        return ()
    return (
        f"EP{layout.ep}: shardwise's trainer does not run expert parallelism yet (capability table); "
        "the operator refuses this layout at admission (UnsupportedByRuntime): pin --expert 1 / "
        "spec.parallelism.expert: 1 for a layout it runs",
    )


def _notes(request: PlanRequest) -> tuple[str, ...]:
    notes = list(request.model.notes)
    if request.model.architecture is None:
        notes.append(
            "only a parameter count is known: activations are unknown (null) and not included in "
            "the totals; the plan checks model states and overhead only"
        )
    if not request.cluster.gpu.known:
        notes.append(
            f"GPU {request.cluster.gpu.name!r} is not in the catalog: step times assume "
            f"{request.cluster.gpu.peak_flops / 1e12:.0f} TFLOP/s and "
            f"{request.cluster.gpu.intra_node_bandwidth / 1e9:.0f} GB/s between GPUs"
        )
    if not request.cluster.gpu.bf16 and request.training.precision.startswith("bf16"):
        notes.append(f"{request.cluster.gpu.name} has no bf16 support: use --precision fp16 (same memory)")
    if request.training.global_batch_size is None:
        notes.append(f"global batch size not given: using {request.global_batch_size} (one per GPU)")
    return tuple(notes)
