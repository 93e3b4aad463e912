"""Diagnosis of an infeasible request: the shortfall and concrete ways out, cheapest first."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from shardwise.planner.errors import PlanInputError
from shardwise.planner.request import Cluster, PlanRequest
from shardwise.planner.result import Diagnosis, Evaluation, WayOut
from shardwise.planner.units import gib

# plan() without diagnosis (injected by the package to avoid a circular import).
Planner = Callable[[PlanRequest], tuple[bool, Evaluation | None]]

# Upper bound of the "more GPUs" search, in multiples of the current count and absolute GPUs.
_MAX_GPU_FACTOR = 64
_MAX_GPUS = 16384
_SEQ_STEP = 128


def _cost(request: PlanRequest, choice: Evaluation) -> float:
    """GPU-seconds per million tokens of the resulting plan: what the way out costs to run."""
    tokens = request.global_batch_size * request.sequence_length
    return choice.step_time.total * choice.layout.gpus * 1e6 / tokens


def _try(planner: Planner, request: PlanRequest) -> Evaluation | None:
    try:
        feasible, choice = planner(request)
    except PlanInputError:
        return None
    return choice if feasible else None


def _more_gpus(planner: Planner, request: PlanRequest) -> tuple[PlanRequest, Evaluation] | None:
    """Fewest whole nodes (same GPUs per node) that fit: doubling, then bisection."""
    cluster = request.cluster

    def with_nodes(n: int) -> PlanRequest:
        return replace(request, cluster=replace(cluster, nodes=n))

    low, high = cluster.nodes, cluster.nodes * 2
    found: Evaluation | None = None
    limit = min(cluster.nodes * _MAX_GPU_FACTOR, max(1, _MAX_GPUS // cluster.gpus_per_node))
    while high <= limit:
        found = _try(planner, with_nodes(high))
        if found is not None:
            break
        low, high = high, high * 2
    if found is None:
        return None
    while high - low > 1:
        mid = (low + high) // 2
        candidate = _try(planner, with_nodes(mid))
        if candidate is not None:
            high, found = mid, candidate
        else:
            low = mid
    return with_nodes(high), found


def _shorter_sequence(planner: Planner, request: PlanRequest) -> tuple[PlanRequest, Evaluation] | None:
    """Longest sequence (multiple of 128) below the requested one that fits: bisection."""
    seq = request.sequence_length

    def with_seq(s: int) -> PlanRequest:
        return replace(request, training=replace(request.training, sequence_length=s))

    high = -(-seq // _SEQ_STEP)  # in steps of 128; high * 128 >= seq does not fit
    found: tuple[PlanRequest, Evaluation] | None = None
    if high <= 1:
        return None
    first = _try(planner, with_seq(_SEQ_STEP))
    if first is None:
        return None
    low, found = 1, (with_seq(_SEQ_STEP), first)
    while high - low > 1:
        mid = (low + high) // 2
        candidate = _try(planner, with_seq(mid * _SEQ_STEP))
        if candidate is not None:
            low, found = mid, (with_seq(mid * _SEQ_STEP), candidate)
        else:
            high = mid
    return found


def diagnose(planner: Planner, request: PlanRequest, closest: Evaluation | None) -> Diagnosis:
    """Smallest shortfall per GPU and ways out: more GPUs (how many), LoRA, QLoRA, offload (with
    the host memory it needs), a shorter sequence; each with the plan it leads to."""
    shortfall = closest.shortfall if closest is not None else 0
    ways: list[WayOut] = []
    training = request.training
    cluster = request.cluster
    arch = request.model.architecture

    more = _more_gpus(planner, request)
    if more is not None:
        req, best = more
        n = req.cluster.total_gpus
        ways.append(
            WayOut(
                "more_gpus",
                f"use {n} GPUs ({req.cluster.nodes} nodes x {cluster.gpus_per_node}) instead of "
                f"{cluster.total_gpus}: {best.layout.describe()}",
                _cost(req, best),
                best.layout,
                best.memory.total,
                (("gpus", n), ("nodes", req.cluster.nodes)),
            )
        )
    if arch is not None and training.method in ("full", "freeze"):
        for method in ("lora", "qlora"):
            req = replace(request, training=replace(training, method=method))
            choice = _try(planner, req)
            if choice is not None:
                ways.append(
                    WayOut(
                        method,
                        f"fine-tune with {method.upper()} (rank {training.lora_rank}, targets "
                        f"{','.join(training.lora_targets)}): {choice.layout.describe()}, "
                        f"{gib(choice.memory.total)} per GPU",
                        _cost(req, choice),
                        choice.layout,
                        choice.memory.total,
                    )
                )
    elif arch is not None and training.method == "lora":
        req = replace(request, training=replace(training, method="qlora"))
        choice = _try(planner, req)
        if choice is not None:
            ways.append(
                WayOut(
                    "qlora",
                    f"quantize the base to 4 bits (QLoRA): {choice.layout.describe()}",
                    _cost(req, choice),
                    choice.layout,
                    choice.memory.total,
                )
            )
    if training.method != "inference" and (
        request.pins.offload == "none" or cluster.node_memory_bytes is not None
    ):
        pins = replace(request.pins, offload=None)
        if pins.zero_stage is not None and pins.zero_stage == 0:
            pins = replace(pins, zero_stage=None)
        req = replace(
            request,
            pins=pins,
            cluster=Cluster(cluster.nodes, cluster.gpus_per_node, cluster.gpu, None),
        )
        choice = _try(planner, req)
        if choice is not None and choice.layout.offload != "none":
            host = choice.cpu_memory_per_node
            ways.append(
                WayOut(
                    "offload",
                    f"offload {choice.layout.offload} to CPU (ZeRO-{choice.layout.zero_stage}) with "
                    f"{gib(host)} of host memory per node: {choice.layout.describe()}",
                    _cost(req, choice),
                    choice.layout,
                    choice.memory.total,
                    (("cpu_memory_per_node", host),),
                )
            )
    if arch is not None:
        shorter = _shorter_sequence(planner, request)
        if shorter is not None:
            req, best = shorter
            ways.append(
                WayOut(
                    "shorter_sequence",
                    f"train on sequences of at most {req.sequence_length} tokens (not "
                    f"{request.sequence_length}): {best.layout.describe()}",
                    _cost(req, best),
                    best.layout,
                    best.memory.total,
                    (("sequence_length", req.sequence_length),),
                )
            )
    ways.sort(key=lambda w: w.cost_gpu_seconds_per_million_tokens)
    if closest is not None:
        message = (
            f"no layout fits: the closest ({closest.layout.describe()}) needs "
            f"{gib(closest.memory.total)} per GPU, {gib(max(shortfall, 0))} more than the "
            f"{gib(closest.capacity)} available"
        )
        if request.settings.memory_correction != 1.0:
            message += (
                f" (the GPU's {gib(request.cluster.gpu.memory_bytes)} over the measured memory"
                f" correction x{request.settings.memory_correction:.3f})"
            )
        if closest.problems and shortfall <= 0:
            message = "no layout fits: " + "; ".join(closest.problems)
    else:
        message = "no valid layout for these GPUs (see rejected)"
    return Diagnosis(max(shortfall, 0), message, tuple(ways))
