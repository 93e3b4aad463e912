"""layout.json (docs/layout-contract.md, version 1) from a plan: architecture, knobs, prediction."""

from __future__ import annotations

from typing import Any

from shardwise.planner import Evaluation, Layout, PlanRequest, PlanResult
from shardwise.planner.cost import step_flops
from shardwise.planner.memory import model_context
from shardwise.planner.methods import first_trainable_layer
from shardwise.resources.deepspeed_config import deepspeed_config_for

LAYOUT_VERSION = 1
RANK_ORDER = ["pp", "dp", "tp"]  # rank = pp_rank*(dp*tp) + dp_rank*tp + tp_rank: TP fastest


def layout_document(request: PlanRequest, evaluation: Evaluation) -> dict[str, Any]:
    """The exact layout.json the operator writes into the `<job>-layout` ConfigMap."""
    model = request.model
    training = request.training
    lora = training.method in ("lora", "qlora")
    freeze = training.method == "freeze"
    arch = model.architecture
    layout = evaluation.layout
    per_stage = []
    for stage, memory in enumerate(evaluation.per_stage):
        per_stage.append(
            {
                "stage": stage,
                "parameters": memory.parameters,
                "gradients": memory.gradients,
                "optimizer_states": memory.optimizer_states,
                "activations": memory.activations,
                "overhead": memory.overhead,
                "total": memory.total,
                "model_state_bytes": memory.model_states,
            }
        )
    return {
        "version": LAYOUT_VERSION,
        "model": {
            "name": model.name,
            "parameters": model.parameters,
            "architecture": model.architecture.to_dict() if model.architecture is not None else None,
        },
        "training": {
            "method": training.method,
            "precision": training.precision,
            "sequence_length": request.sequence_length,
            "global_batch_size": request.global_batch_size,
            "lora_rank": training.lora_rank if lora else None,
            "lora_targets": list(training.lora_targets) if lora else [],
            "lora_alpha": training.effective_lora_alpha if lora else None,
            "lora_dropout": training.lora_dropout if lora else None,
            "trainable_fraction": training.trainable_fraction if freeze else None,
            # freeze: layers [0, first_trainable_layer) are frozen, with the embedding
            "first_trainable_layer": (
                first_trainable_layer(arch.layers, training.trainable_fraction)
                if freeze and arch is not None
                else 0
            ),
            "model_source": training.model_source,
            "optimizer": training.optimizer,
        },
        "layout": layout.to_dict(),
        "ranks": {
            "order": list(RANK_ORDER),
            "stage_layers": [list(bounds) for bounds in evaluation.stage_layers],
        },
        "predicted": {
            "gpu_memory_bytes": evaluation.capacity,
            "per_stage": per_stage,
            "cpu_memory_per_node": evaluation.cpu_memory_per_node,
            "step_time_seconds": evaluation.step_time.total,
            # What measured MFU is computed from (status.progress.mfu): model FLOPs of one step
            # without recompute (recompute is overhead, not model work), the catalog GPU's peak and
            # the MFU the step-time estimate assumed.
            "model_flops_per_step": step_flops(model_context(request), "none"),
            "gpu": request.cluster.gpu.name,
            "gpu_peak_flops": request.cluster.gpu.peak_flops,
            "mfu": request.settings.mfu,
        },
        "deepspeed": deepspeed_config_for(request, layout),
    }


def layout_document_for(result: PlanResult) -> dict[str, Any]:
    """layout.json of a feasible plan's chosen layout; ValueError when the plan is infeasible."""
    if not result.feasible or result.choice is None:
        raise ValueError("the plan is infeasible: there is no layout to write")
    return layout_document(result.request, result.choice)


def status_layout(evaluation: Evaluation) -> dict[str, Any]:
    """The ParallelTrainingJob `status.layout` object (CRD names) of a planned layout; fed back
    through shardwise.jobspec.pins_from_status_layout it reproduces the same layout."""
    layout = evaluation.layout
    return {
        "tensor": layout.tp,
        "pipeline": layout.pp,
        "data": layout.dp,
        "zeroStage": layout.zero_stage,
        "expert": layout.ep,
        "microBatchSize": layout.micro_batch,
        "gradientAccumulation": layout.grad_accum,
        "activationCheckpointing": layout.checkpointing,
        "sequenceParallel": layout.sequence_parallel,
        "offload": layout.offload,
        "nodes": layout.nodes,
        "gpusPerNode": layout.gpus_per_node,
        "gpus": layout.gpus,
        "predictedGpuMemoryBytes": evaluation.memory.total,
        "gpuMemoryBytes": evaluation.capacity,
        "hostMemoryBytes": max(0, int(evaluation.cpu_memory_per_node)),
        "summary": layout_summary(layout),
    }


def layout_summary(layout: Layout) -> str:
    """The compact form of the printer column, e.g. `TP2×PP4×DP8 Z1` (`… EP4` with experts split)."""
    ep = f" EP{layout.ep}" if layout.ep > 1 else ""
    return f"TP{layout.tp}×PP{layout.pp}×DP{layout.dp} Z{layout.zero_stage}{ep}"
