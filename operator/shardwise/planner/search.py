"""Layout search: enumerate every valid layout, filter by memory, rank by step time.

Constraints (issue 2; Narayanan et al. 2021 §3): TP divides the attention heads and the kv heads
(and the ffn size and vocabulary, see tp_misfit) and the GPUs of one node (a TP group never
leaves its NVLink domain); PP is at most the layer count, stages balanced to within one layer
(see architecture.split_layers); TP·PP·DP equals all the GPUs of the request (GPUs are never
idled silently: when no layout uses them all, the rejections say why); ZeRO > 1 never with PP
(DeepSpeed's pipeline engine refuses it); global batch = micro-batch · gradient accumulation · DP.

Speed: model states depend on (TP, PP, ZeRO, offload) only and activations are linear in the
micro-batch for a fixed number of in-flight micro-batches, so both are computed once per
combination and only at the few stages that can be the worst (memory.representative_stages).
Memory is monotone in the micro-batch, so the micro-batch loop stops at the first misfit.
Megatron sequence parallelism is planned only where the trainer runs it (a capability-table row
with ``sequence_parallel``); there it is on whenever TP > 1 unless pinned off (it moves the same
bytes as plain TP and strictly lowers activation memory, so the off variant is dominated).
Everywhere else the plan counts the activations TP replicates on every rank.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from math import ceil

from shardwise.planner import activations as act
from shardwise.planner import capabilities as caps
from shardwise.planner import moe
from shardwise.planner.architecture import Architecture
from shardwise.planner.cost import stage_maxima, step_flops, step_time, step_time_model
from shardwise.planner.errors import PlanInputError
from shardwise.planner.layout import Layout
from shardwise.planner.memory import (
    ActivationUnits,
    ModelContext,
    activation_units,
    cpu_memory_per_node,
    overhead_terms,
    representative_stages,
    stage_breakdown,
    stage_counts,
    stage_model_states,
)
from shardwise.planner.request import Offload, PlanRequest
from shardwise.planner.result import Evaluation, Rejection

# Pipeline degrees tried for a model known only by its parameter count (no layer count).
_PARAMS_ONLY_MAX_PP = 64

REASON_BATCH = "global batch not divisible by DP x micro-batch"
REASON_STATES = "model states + overhead exceed GPU memory"
REASON_ACTIVATIONS = "activations exceed the memory left at the smallest micro-batch"
REASON_HOST = "offloaded states exceed the node's host memory"
REASON_TP_HEADS = "TP does not divide the heads, kv heads, ffn size and vocabulary"
REASON_PP_GPUS = "TP x PP does not divide the GPU count"
REASON_PP_LAYERS = "PP above the layer count"
REASON_ZERO_PP = "ZeRO stage 2/3 with PP > 1 (DeepSpeed refuses it)"
#: Prefix of the rejections the trainer's capability table makes (planning.py reads it).
REASON_RUNTIME_PREFIX = "the trainer cannot run"


def tp_misfit(arch: Architecture | None, tp: int) -> str | None:
    """Why TP cannot split this shape, or None. Megatron-style TP splits the heads and kv heads,
    the MLP's ffn dimension (column-parallel) and the vocabulary (vocab-parallel embedding and
    head); the trainer (shardwise_trainer.contract) refuses a layout that splits any unevenly."""
    if arch is None:
        return None
    if arch.heads % tp or arch.kv_heads % tp:
        return f"TP={tp} does not divide the attention heads ({arch.heads}) and kv heads ({arch.kv_heads})"
    if arch.ffn_hidden_size % tp or arch.vocab_size % tp:
        sizes = f"ffn size ({arch.ffn_hidden_size}) and vocabulary ({arch.vocab_size})"
        return f"TP={tp} does not divide the {sizes}"
    return None


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def validate(request: PlanRequest) -> None:
    """Pin checks that are input errors (exit 2), each naming the bad value."""
    pins = request.pins
    cluster = request.cluster
    arch = request.model.architecture
    gpus = cluster.total_gpus
    method = request.training.method
    if arch is None and method in ("lora", "qlora", "freeze"):
        raise PlanInputError(f"method {method} needs a model architecture, not only a parameter count")
    if pins.tp is not None:
        misfit = tp_misfit(arch, pins.tp)
        if misfit is not None:
            raise PlanInputError(misfit)
        if cluster.gpus_per_node % pins.tp:
            raise PlanInputError(
                f"TP={pins.tp} does not divide the {cluster.gpus_per_node} GPUs per node "
                "(TP stays inside a node)"
            )
    if pins.pp is not None and arch is not None and pins.pp > arch.layers:
        raise PlanInputError(f"PP={pins.pp} exceeds the {arch.layers} layers")
    if pins.expert is not None:
        moe.check_expert_pin(arch, pins.expert)
    tp, pp = pins.tp or 1, pins.pp or 1
    if gpus % (tp * pp):
        raise PlanInputError(f"{gpus} GPUs are not divisible by TP x PP = {tp} x {pp}")
    if pins.zero_stage is not None and pins.zero_stage > 1 and pins.pp is not None and pins.pp > 1:
        raise PlanInputError(f"ZeRO stage {pins.zero_stage} cannot be combined with PP={pins.pp} (DeepSpeed)")
    if pins.offload == "all" and pins.zero_stage is not None and pins.zero_stage != 3:
        raise PlanInputError(f"offload=all (parameters) needs ZeRO stage 3, not {pins.zero_stage}")
    if pins.offload == "optimizer" and pins.zero_stage == 0:
        raise PlanInputError("offload=optimizer needs ZeRO stage 1, 2 or 3, not 0")
    if pins.sequence_parallel and pins.tp == 1:
        raise PlanInputError("sequence parallelism needs TP > 1, but TP=1 is pinned")
    if method == "inference" and pins.offload not in (None, "none"):
        raise PlanInputError(f"offload={pins.offload} applies to training, not inference")
    if method == "inference" and pins.zero_stage not in (None, 0):
        raise PlanInputError(f"ZeRO stage {pins.zero_stage} applies to training, not inference")


@dataclass(slots=True)
class _Rejections:
    counts: dict[str, int] = field(default_factory=dict)
    closest: dict[str, tuple[int, Layout]] = field(default_factory=dict)

    def add(
        self, reason: str, n: int = 1, shortfall: int | None = None, layout: Layout | None = None
    ) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        if shortfall is not None and layout is not None:
            best = self.closest.get(reason)
            if best is None or shortfall < best[0]:
                self.closest[reason] = (shortfall, layout)

    def summary(self) -> tuple[Rejection, ...]:
        out = []
        for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            close = self.closest.get(reason)
            out.append(Rejection(reason, n, close[1] if close else None, close[0] if close else None))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class SearchOutcome:
    ranked: tuple[Layout, ...]  # fitting layouts, fastest first (best + alternatives)
    closest: Layout | None  # smallest shortfall among misfits
    closest_shortfall: int | None
    rejected: tuple[Rejection, ...]
    considered: int


def _tp_candidates(request: PlanRequest) -> list[int]:
    pins = request.pins
    if pins.tp is not None:
        return [pins.tp]
    arch = request.model.architecture
    gpn = request.cluster.gpus_per_node
    out = []
    for tp in divisors(gpn):
        if tp_misfit(arch, tp) is not None:
            continue
        if pins.sequence_parallel and tp == 1:
            continue
        out.append(tp)
    return out


def _pp_candidates(request: PlanRequest, tp: int) -> list[int]:
    if request.pins.pp is not None:
        return [request.pins.pp]
    arch = request.model.architecture
    limit = arch.layers if arch is not None else _PARAMS_ONLY_MAX_PP
    rest = request.cluster.total_gpus // tp
    return [pp for pp in divisors(rest) if pp <= limit]


def _pp_ep_candidates(request: PlanRequest, tp: int) -> list[tuple[int, int]]:
    """(PP, EP) pairs: EP divides the data-parallel degree and the experts (planner/moe.py)."""
    arch = request.model.architecture
    gpus = request.cluster.total_gpus
    out: list[tuple[int, int]] = []
    for pp in _pp_candidates(request, tp):
        dp = gpus // (tp * pp) if gpus % (tp * pp) == 0 else 1
        eps = moe.expert_candidates(
            arch, dp, request.pins.expert, tp=tp, gpus_per_node=request.cluster.gpus_per_node
        )
        out.extend((pp, ep) for ep in eps)
    return out


def search(ctx: ModelContext, keep: int) -> SearchOutcome:
    """Every valid layout of the request; the `keep` fastest that fit, and why the rest failed."""
    request = ctx.request
    pins = request.pins
    cluster = request.cluster
    gpus = cluster.total_gpus
    gpn = cluster.gpus_per_node
    cap = request.usable_gpu_memory
    node_memory = cluster.node_memory_bytes
    training = ctx.method != "inference"
    rejections = _Rejections()
    flops_by_ckpt = {c: step_flops(ctx, c) for c in act.CHECKPOINTING}
    # Compute time alone is a lower bound of any layout's step time (every other term is >= 0):
    # a layout whose bound cannot beat the slowest one kept is not timed at all.
    peak = gpus * cluster.gpu.peak_flops * request.settings.mfu
    bound_by_ckpt = {c: f / peak for c, f in flops_by_ckpt.items()}
    ckpts: tuple[act.Checkpointing, ...]
    if pins.checkpointing is not None:
        ckpts = (pins.checkpointing,)
    elif not training or ctx.arch is None:
        ckpts = ("none",)  # nothing to recompute / activations unknown
    else:
        ckpts = act.CHECKPOINTING
    best: list[tuple[float, int, int, Layout]] = []  # max-heap by time via negation
    # offload: auto offloads only when nothing fits without it (the CRD's promise): offloading
    # layouts are ranked apart and returned only when no layout without offload fits.
    best_offload: list[tuple[float, int, int, Layout]] = []
    closest: tuple[int, Layout] | None = None  # smallest GPU shortfall (host memory fits)
    host_closest: tuple[int, Layout] | None = None  # smallest host shortfall
    considered = 0
    seq_no = 0
    global_batch = ctx.global_batch

    arch = ctx.arch
    method = ctx.method
    source = request.training.model_source
    # Sequence parallelism is planned only where the trainer runs it (capabilities.TABLE).
    respect = request.settings.respect_runtime
    model_family = arch.family if arch is not None else None
    vision_tower = arch is not None and arch.extra_parameters > 0
    sp_runs = not respect or any(c.sequence_parallel for c in caps.rows(method, source))
    # `shardwise plan` may plan EP beyond what the trainer runs (plan() notes it); admission does not.
    ep_beyond = request.settings.plan_expert_parallel_beyond_runtime
    if pins.tp is None and arch is not None:
        excluded = [tp for tp in divisors(gpn) if tp_misfit(arch, tp) is not None]
        if excluded:
            rejections.add(REASON_TP_HEADS, len(excluded))
    for tp in _tp_candidates(request):
        if pins.pp is None:
            limit = arch.layers if arch is not None else _PARAMS_ONLY_MAX_PP
            misfits = sum(1 for pp in range(2, limit + 1) if (gpus // tp) % pp)
            if misfits:
                rejections.add(REASON_PP_GPUS, misfits)
            too_deep = sum(1 for pp in divisors(gpus // tp) if pp > limit)
            if too_deep:
                rejections.add(REASON_PP_LAYERS, too_deep)
        sps = [pins.sequence_parallel] if pins.sequence_parallel is not None else [tp > 1 and sp_runs]
        for pp, ep in _pp_ep_candidates(request, tp):
            if gpus % (tp * pp):
                # A pinned PP with a TP that leaves no whole data-parallel replica.
                rejections.add(REASON_PP_GPUS)
                continue
            dp = gpus // (tp * pp)
            ep_misfit = moe.ep_misfit(arch, ep, dp)
            if ep_misfit is not None:
                rejections.add(ep_misfit)
                continue
            if global_batch % dp:
                rejections.add(REASON_BATCH)
                continue
            per_replica = global_batch // dp
            micros = divisors(per_replica)
            if pins.micro_batch is not None:
                if per_replica % pins.micro_batch:
                    rejections.add(REASON_BATCH)
                    continue
                micros = [pins.micro_batch]
            counts = stage_counts(ctx, tp, pp, ep)
            reps = representative_stages(counts)
            heaviest = stage_maxima(counts)
            if pins.zero_stage is not None:
                zeros = [pins.zero_stage]
            elif not training:
                zeros = [0]
            else:
                zeros = [0, 1] if pp > 1 else [0, 1, 2, 3]
            if pp > 1:
                if training and pins.zero_stage is None:
                    rejections.add(REASON_ZERO_PP, 2)
                zeros = [z for z in zeros if z <= 1]
            # Activation units per representative stage, per (sp, ckpt): independent of ZeRO.
            # Floats in the search (speed); plan() re-evaluates the layouts it returns exactly.
            units: dict[tuple[bool, str], list[tuple[float, float] | None]] = {}
            for sp in sps:
                for ck in ckpts:
                    units[(bool(sp), ck)] = [
                        _as_floats(activation_units(ctx, c, tp, bool(sp), ck)) for c in reps
                    ]
            stages = [(c.stage, pp - c.stage) for c in reps]
            for zero in zeros:
                offloads = _offloads(pins.offload, zero, training)
                if not offloads:
                    rejections.add(f"offload={pins.offload} is not possible with ZeRO stage {zero}")
                for offload in offloads:
                    runnable_sps = []
                    for sp in sps:
                        refused = None if not respect else caps.refusal(
                            method=method, model=source, tp=tp, pp=pp, sequence_parallel=bool(sp),
                            zero_stage=zero, offload=offload, expert=1 if ep_beyond else ep,
                            family=model_family, vision_tower=vision_tower,
                        )  # fmt: skip
                        if refused is None:
                            runnable_sps.append(sp)
                        else:
                            rejections.add(refused, len(ckpts))
                    if not runnable_sps:
                        continue
                    base: list[int] = []
                    host_max = 0
                    for c in reps:
                        w, g, o, host = stage_model_states(ctx, c, dp, zero, offload)
                        terms = overhead_terms(ctx, c, dp, zero, gpus)
                        base.append(w + g + o + sum(v for _, v in terms))
                        host_max = max(host_max, host)
                    host_node = cpu_memory_per_node(host_max, gpn)
                    host_short = node_memory is not None and host_node > node_memory
                    for sp in runnable_sps:
                        for ck in ckpts:
                            considered += 1
                            if host_short:
                                # Host memory does not depend on the micro-batch: the whole family
                                # fails, and is not a candidate for "closest" on the GPU side.
                                example = Layout(
                                    tp, pp, dp, zero, micros[0], per_replica // micros[0], ck, bool(sp),
                                    offload, cluster.nodes, gpn, ep,
                                )  # fmt: skip
                                over = host_node - (node_memory or 0)
                                rejections.add(REASON_HOST, 1, over, example)
                                if host_closest is None or over < host_closest[0]:
                                    host_closest = (over, example)
                                continue
                            lay_units = units[(bool(sp), ck)]
                            family = Layout(
                                tp,
                                pp,
                                dp,
                                zero,
                                1,
                                per_replica,
                                ck,
                                bool(sp),
                                offload,
                                cluster.nodes,
                                gpn,
                                ep,
                            )
                            timing = step_time_model(ctx, family, heaviest, flops_by_ckpt[ck])
                            for micro in micros:
                                accum = per_replica // micro
                                layout = Layout(
                                    tp, pp, dp, zero, micro, accum, ck, bool(sp), offload, cluster.nodes, gpn,
                                    ep,
                                )  # fmt: skip
                                worst = 0
                                for i, u in enumerate(lay_units):
                                    total = base[i]
                                    if u is not None:
                                        # 1F1B in-flight micro-batches, activations.in_flight_micro_batches
                                        inflight = min(stages[i][1], accum)
                                        total += ceil(micro * (inflight * u[0] + u[1]))
                                    worst = max(worst, total)
                                if worst > cap:
                                    if micro == micros[0]:
                                        reason = REASON_STATES if max(base) > cap else REASON_ACTIVATIONS
                                        rejections.add(reason, 1, worst - cap, layout)
                                        if closest is None or worst - cap < closest[0]:
                                            closest = (worst - cap, layout)
                                    break
                                heap = best if offload == "none" or pins.offload is not None else best_offload
                                if len(heap) >= keep and bound_by_ckpt[ck] > -heap[0][0]:
                                    continue
                                t = timing.total(micro, accum)
                                seq_no += 1
                                # Equal times (e.g. ZeRO-0 vs ZeRO-1 move the same bytes): less memory wins.
                                item = (-t, -worst, -seq_no, layout)
                                if len(heap) < keep:
                                    heapq.heappush(heap, item)
                                elif item > heap[0]:
                                    heapq.heapreplace(heap, item)
    if closest is None:
        closest = host_closest
    ranked = tuple(item[3] for item in sorted(best or best_offload, key=lambda it: (-it[0], -it[1], -it[2])))
    return SearchOutcome(
        ranked=ranked,
        closest=closest[1] if closest else None,
        closest_shortfall=closest[0] if closest else None,
        rejected=rejections.summary(),
        considered=considered,
    )


def _as_floats(units: ActivationUnits | None) -> tuple[float, float] | None:
    return None if units is None else (float(units.per_in_flight), float(units.fixed))


def _offloads(pinned: Offload | None, zero: int, training: bool) -> list[Offload]:
    """Offload options valid for a ZeRO stage: optimizer offload from stage 1 (DeepSpeed
    offload_optimizer), parameter offload only with stage 3 (offload_param)."""
    valid: list[Offload] = ["none"]
    if training and zero >= 1:
        valid.append("optimizer")
    if training and zero == 3:
        valid.append("all")
    if pinned is not None:
        return [pinned] if pinned in valid else []
    return valid


def evaluate_with(ctx: ModelContext, layout: Layout) -> Evaluation:
    """Full per-stage evaluation of one layout (every stage, exact arithmetic)."""
    request = ctx.request
    cluster = request.cluster
    counts = stage_counts(ctx, layout.tp, layout.pp, layout.ep)
    per_stage = []
    host_max = 0
    for c in counts:
        breakdown, host = stage_breakdown(ctx, c, layout)
        per_stage.append(breakdown)
        host_max = max(host_max, host)
    host_node = cpu_memory_per_node(host_max, cluster.gpus_per_node)
    heaviest = stage_maxima(counts)
    time = step_time(ctx, layout, heaviest, step_flops(ctx, layout.checkpointing))
    cap = request.usable_gpu_memory
    problems = []
    worst = max(m.total for m in per_stage)
    if worst > cap:
        problems.append(f"needs {worst} bytes per GPU, {worst - cap} more than the {cap} available")
    if cluster.node_memory_bytes is not None and host_node > cluster.node_memory_bytes:
        problems.append(
            f"offload needs {host_node} bytes of host memory per node, node has {cluster.node_memory_bytes}"
        )
    return Evaluation(
        layout=layout,
        per_stage=tuple(per_stage),
        stage_layers=tuple((c.first_layer, c.last_layer) for c in counts),
        capacity=cap,
        cpu_memory_per_node=host_node,
        step_time=time,
        problems=tuple(problems),
    )
