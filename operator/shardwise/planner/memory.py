"""Per-GPU memory of a layout: ZeRO model states, activations, framework overhead, host memory.

Model states follow the ZeRO paper (Rajbhandari et al. 2019, arXiv:1910.02054, §3.1 and §5;
memory-model.md §1) with P the parameters held by one model-parallel rank (its TP shard of its
PP stage, plus the embedding / output layer on the stages that hold them) and N_d the DP degree:

    stage 0: (2 + 2 + K)·P      stage 1: 2P + 2P + K·P/N_d
    stage 2: 2P + (2 + K)·P/N_d stage 3: (2 + 2 + K)·P/N_d

Precision conventions (bytes per parameter: weights, gradients, optimizer K):
    bf16 / fp16  mixed precision with fp32 master weights, the ZeRO paper's setting: 2, 2, K=12
                 (fp32 master copy, momentum, variance, 4 bytes each)
    bf16-pure    bf16 weights and gradients, AdamW moments kept in bf16, no master copy: 2, 2, 4
    fp32         fp32 weights and gradients, fp32 moments: 4, 4, K=8 without ZeRO (the weights
                 are the master); K=12 with ZeRO >= 1, because DeepSpeed's ZeRO optimizer keeps
                 its own flat fp32 partition of the weights even when the model is fp32
                 (stage_1_and_2.py `single_partition_of_fp32_groups`, stage3.py
                 `fp32_partitioned_groups_flat`) — measured on CPU by the trainer's fidelity test

Methods: a vision tower (Qwen2-VL) is frozen under every method (text-only fine-tuning, as the
trainer runs it). LoRA / QLoRA keep the full-fine-tuning activation accounting (the gradient flows
through every layer down to the first adapter); it is an upper bound, since a frozen linear layer
need not save its input. Freeze keeps activations only for the trained (last) layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from math import ceil

from shardwise.planner import activations as act
from shardwise.planner import moe
from shardwise.planner.architecture import Architecture, split_layers
from shardwise.planner.layout import Layout
from shardwise.planner.methods import QLORA_BYTES_PER_PARAM, first_trainable_layer, lora_params_per_layer
from shardwise.planner.request import PlanRequest


@dataclass(frozen=True, slots=True)
class PrecisionBytes:
    param: int  # 16-bit (or fp32) working weights
    grad: int
    optimizer: int  # K of the ZeRO paper
    activation: int  # size of an activation element
    cpu_grad: int  # gradient copy on the host when the optimizer is offloaded (fp32 for CPU-Adam)
    frozen: int  # frozen base weights (LoRA, freeze, inference)


PRECISION_BYTES: dict[str, PrecisionBytes] = {
    "bf16": PrecisionBytes(2, 2, 12, 2, 4, 2),
    "fp16": PrecisionBytes(2, 2, 12, 2, 4, 2),
    "bf16-pure": PrecisionBytes(2, 2, 4, 2, 2, 2),
    "fp32": PrecisionBytes(4, 4, 8, 4, 4, 4),
}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def zero_model_states(
    params: int, dp: int, stage: int, *, k: int = 12, param_bytes: int = 2, grad_bytes: int = 2
) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer states) bytes per device, the ZeRO paper's table.

    Shards are rounded up (a partition is padded to equal size, as DeepSpeed does)."""
    weights = ceil_div(param_bytes * params, dp) if stage >= 3 else param_bytes * params
    grads = ceil_div(grad_bytes * params, dp) if stage >= 2 else grad_bytes * params
    optimizer = ceil_div(k * params, dp) if stage >= 1 else k * params
    return weights, grads, optimizer


@dataclass(frozen=True, slots=True)
class StageCounts:
    """What one model-parallel rank of one pipeline stage holds (a TP shard)."""

    stage: int
    first_layer: int
    last_layer: int
    params: int  # all parameters on this rank
    trainable: int  # parameters with gradients and optimizer states
    frozen_bytes: int  # bytes of the frozen (non-trainable) weights at their storage size
    active_layers: int  # layers whose activations are kept for backward
    embedding: bool
    output: bool
    largest_module: int  # parameters ZeRO-3 gathers at once on this rank (largest layer / TP)
    # Mixture of experts: the EP degree, and the routed-expert part of `trainable` / `frozen_bytes`
    # (ZeRO partitions it over the dp / ep ranks holding the same experts).
    ep: int = 1
    expert_trainable: int = 0
    expert_frozen_bytes: int = 0
    active_moe_layers: int = 0


@dataclass(frozen=True, slots=True)
class MemoryBreakdown:
    """Bytes per GPU; activations None when only a parameter count is known (unknown, not 0)."""

    parameters: int
    gradients: int
    optimizer_states: int
    activations: int | None
    overhead: int
    overhead_terms: tuple[tuple[str, int], ...] = ()

    @property
    def total(self) -> int:
        """Sum of the terms (an unknown activation term contributes nothing: see `activations`)."""
        known = self.parameters + self.gradients + self.optimizer_states + self.overhead
        return known + (self.activations or 0)

    @property
    def model_states(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states

    def to_dict(self, capacity: int) -> dict[str, object]:
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer_states": self.optimizer_states,
            "activations": self.activations,
            "overhead": self.overhead,
            "total": self.total,
            "capacity": capacity,
            "overhead_terms": dict(self.overhead_terms),
        }


@dataclass(frozen=True, slots=True)
class ModelContext:
    """Request-wide values computed once per plan()."""

    request: PlanRequest
    arch: Architecture | None
    precision: PrecisionBytes
    seq: int
    global_batch: int
    first_trainable: int  # freeze: first trainable layer; other methods 0
    lora_per_layer: int

    @property
    def method(self) -> str:
        return self.request.training.method


def model_context(request: PlanRequest) -> ModelContext:
    arch = request.model.architecture
    training = request.training
    first = 0
    lora = 0
    if arch is not None:
        if training.method == "freeze":
            first = first_trainable_layer(arch.layers, training.trainable_fraction)
        if training.method in ("lora", "qlora"):
            lora = lora_params_per_layer(arch, training.lora_rank, training.lora_targets)
    return ModelContext(
        request=request,
        arch=arch,
        precision=PRECISION_BYTES[training.precision],
        seq=request.sequence_length,
        global_batch=request.global_batch_size,
        first_trainable=first,
        lora_per_layer=lora,
    )


def stage_counts(ctx: ModelContext, tp: int, pp: int, ep: int = 1) -> tuple[StageCounts, ...]:
    """Per-stage parameter counts on one TP (and EP) rank, by method (full / LoRA / QLoRA / freeze /
    inference); routed experts split by EP x TP (planner/moe.py)."""
    arch = ctx.arch
    method = ctx.method
    frozen_b = ctx.precision.frozen
    if arch is None:
        # Parameter count only: stages split evenly by parameters.
        share = ceil_div(ctx.request.model.parameters, tp * pp)
        return tuple(
            StageCounts(
                stage=i,
                first_layer=0,
                last_layer=0,
                params=share,
                trainable=0 if method == "inference" else share,
                frozen_bytes=share * frozen_b if method == "inference" else 0,
                active_layers=0,
                embedding=i == 0,
                output=i == pp - 1,
                largest_module=share,
            )
            for i in range(pp)
        )
    shards = moe.layer_shards(arch, tp, ep)
    vocab_shard = ceil_div(arch.vocab_size * arch.hidden_size, tp)  # vocab-parallel (Megatron)
    embedding = vocab_shard + arch.embedding_params - arch.vocab_size * arch.hidden_size
    embedding += ceil_div(arch.extra_parameters, tp)  # vision tower: first stage, TP-sharded
    # Tied embeddings are one matrix when one stage holds both ends; with pp > 1 the last stage
    # keeps a copy of it as its output layer (Megatron's convention, gradients all-reduced).
    head = vocab_shard if (not arch.tied_embeddings or pp > 1) else 0
    output = arch.norm_params + head
    largest = max(shards.dense, shards.moe, vocab_shard)
    counts: list[StageCounts] = []
    for i, (first, last) in enumerate(split_layers(arch.layers, pp)):
        n = last - first
        dense_n, moe_n = arch.layers_in(first, last)
        layers = dense_n * shards.dense + moe_n * shards.moe
        params = layers + (embedding if i == 0 else 0) + (output if i == pp - 1 else 0)
        experts = moe_n * shards.experts
        active, active_moe = n, moe_n
        expert_trainable = expert_frozen = 0
        # A vision tower (extra_parameters, stage 0) stays frozen: the trainer runs text-only SFT.
        tower = ceil_div(arch.extra_parameters, tp) if i == 0 else 0
        if method == "full":
            trainable, frozen = params - tower, tower * frozen_b
            expert_trainable = experts
        elif method == "inference":
            trainable, frozen = 0, params * frozen_b
            expert_frozen = experts * frozen_b
        elif method in ("lora", "qlora"):
            trainable = n * ceil_div(ctx.lora_per_layer, tp)
            if method == "qlora":
                quantized = dense_n * shards.dense_quantized + moe_n * shards.moe_quantized
                frozen = ceil(quantized * QLORA_BYTES_PER_PARAM) + (params - quantized) * frozen_b
                expert_frozen = ceil(experts * QLORA_BYTES_PER_PARAM)
            else:
                frozen = params * frozen_b
                expert_frozen = experts * frozen_b
        else:  # freeze: the last layers train, the embedding, head and earlier layers do not
            start = max(first, ctx.first_trainable)
            trained_dense, trained_moe = arch.layers_in(start, last) if start < last else (0, 0)
            trainable = trained_dense * shards.dense + trained_moe * shards.moe
            frozen = (params - trainable) * frozen_b
            expert_trainable = trained_moe * shards.experts
            expert_frozen = (moe_n - trained_moe) * shards.experts * frozen_b
            active, active_moe = trained_dense + trained_moe, trained_moe
        counts.append(
            StageCounts(
                stage=i,
                first_layer=first,
                last_layer=last,
                params=params,
                trainable=trainable,
                frozen_bytes=frozen,
                active_layers=active,
                embedding=i == 0,
                output=i == pp - 1,
                largest_module=largest,
                ep=ep,
                expert_trainable=expert_trainable,
                expert_frozen_bytes=expert_frozen,
                active_moe_layers=active_moe,
            )
        )
    return tuple(counts)


def representative_stages(counts: tuple[StageCounts, ...]) -> tuple[StageCounts, ...]:
    """The stages that can be the worst: the first, the last, and the earliest stage of each class
    of equal layer count, active layers and held states (within a class, memory differs only by
    the in-flight micro-batches, which fall with the stage index)."""
    chosen: dict[int, StageCounts] = {0: counts[0], len(counts) - 1: counts[-1]}
    seen: set[tuple[int, int, int, int]] = set()
    for c in counts[1:-1]:
        key = (c.last_layer - c.first_layer, c.active_layers, c.trainable, c.frozen_bytes)
        if key not in seen:
            seen.add(key)
            chosen[c.stage] = c
    return tuple(chosen[k] for k in sorted(chosen))


@dataclass(frozen=True, slots=True)
class ActivationUnits:
    """Stage activations for micro-batch 1: bytes = b·(in_flight·per_in_flight + fixed)."""

    per_in_flight: Fraction
    fixed: Fraction


# Per-layer values depend on (shape, sequence, TP, SP, checkpointing, dtype) only: cached so the
# search computes each once, whatever the number of (PP, ZeRO, offload) combinations.
@lru_cache(maxsize=8192)
def _layer_unit(
    arch: Architecture, seq: int, tp: int, sp: bool, *, ckpt: act.Checkpointing, e: int
) -> Fraction:
    return act.layer_activation_bytes(
        arch, seq, 1, tp=tp, sequence_parallel=sp, checkpointing=ckpt, act_bytes=e, accounting=act.RUNTIME
    )


@lru_cache(maxsize=8192)
def _working_unit(
    arch: Architecture, seq: int, tp: int, sp: bool, *, ckpt: act.Checkpointing, e: int
) -> Fraction:
    return act.recompute_working_set_bytes(
        arch, seq, 1, tp=tp, sequence_parallel=sp, checkpointing=ckpt, act_bytes=e, accounting=act.RUNTIME
    )


@lru_cache(maxsize=8192)
def _output_unit(arch: Architecture, seq: int, tp: int, sp: bool, e: int) -> Fraction:
    return act.output_activation_bytes(
        arch, seq, 1, tp=tp, sequence_parallel=sp, act_bytes=e, accounting=act.RUNTIME
    )


@lru_cache(maxsize=8192)
def _moe_unit(arch: Architecture, seq: int, tp: int, sp: bool, *, full: bool, e: int) -> Fraction:
    return moe.moe_layer_extra_activation_bytes(
        arch, seq, tp=tp, sequence_parallel=sp, full_recompute=full, act_bytes=e
    )


def clear_caches() -> None:
    """Drop the per-layer caches (benchmarks time a cold search with it)."""
    for cached in (_layer_unit, _working_unit, _output_unit, _stage_units, _moe_unit):
        cached.cache_clear()


def activation_units(
    ctx: ModelContext, c: StageCounts, tp: int, sp: bool, ckpt: act.Checkpointing
) -> ActivationUnits | None:
    """Korthikanti accounting for this stage at micro-batch 1; None when the shape is unknown."""
    if ctx.arch is None:
        return None
    return _stage_units(
        ctx.arch,
        ctx.seq,
        tp,
        sp,
        ckpt=ckpt,
        e=ctx.precision.activation,
        layers=c.last_layer - c.first_layer,
        active=c.active_layers,
        embedding=c.embedding and ctx.first_trainable == 0,
        output=c.output,
        inference=ctx.method == "inference",
        moe_active=c.active_moe_layers,
        ep=min(c.ep, 2),  # only "split or not" matters here: one cache entry for every EP > 1
    )


@lru_cache(maxsize=8192)
def _stage_units(
    arch: Architecture,
    seq: int,
    tp: int,
    sp: bool,
    *,
    ckpt: act.Checkpointing,
    e: int,
    layers: int,
    active: int,
    embedding: bool,
    output: bool,
    inference: bool,
    moe_active: int = 0,
    ep: int = 1,
) -> ActivationUnits:
    if inference:
        # Weights + KV cache (memory-model.md §5); no activations are kept for a backward pass.
        return ActivationUnits(
            Fraction(0), Fraction(act.kv_cache_bytes(arch, layers, seq, 1, tp=tp, dtype_bytes=e))
        )
    per = active * _layer_unit(arch, seq, tp, sp, ckpt=ckpt, e=e)
    # MoE layers: the k routed experts' MLPs, routed token copies and router logits (planner/moe.py).
    if moe_active:
        per += moe_active * _moe_unit(arch, seq, tp, sp, full=ckpt == "full", e=e)
    if embedding and active == layers:
        per += act.embedding_activation_bytes(arch, seq, 1, tp, sp)
    fixed = Fraction(0)
    if output:
        fixed += _output_unit(arch, seq, tp, sp, e)
    if active:
        fixed += _working_unit(arch, seq, tp, sp, ckpt=ckpt, e=e)
    if moe_active:
        # One layer's all-to-all send / receive buffers; a recomputed MoE layer rebuilds its extra.
        fixed += moe.dispatch_buffer_bytes(arch, seq, ep=ep, act_bytes=e)
        if ckpt == "full":
            fixed += _moe_unit(arch, seq, tp, sp, full=False, e=e)
    return ActivationUnits(per, fixed)


def overhead_terms(
    ctx: ModelContext, c: StageCounts, dp: int, zero: int, world: int
) -> tuple[tuple[str, int], ...]:
    """Framework memory as explicit terms (memory-model.md §5), each configurable in settings."""
    s = ctx.request.settings
    p = ctx.precision
    terms: list[tuple[str, int]] = [("cuda_context", s.cuda_context_bytes)]
    if world > 1:
        terms.append(("nccl_buffers", s.nccl_buffer_bytes))
    training = ctx.method != "inference"
    # A bucket never holds more than the tensors it carries (DeepSpeed sizes it to the smaller).
    reduce = min(s.reduce_bucket_elements, c.trainable)
    if training and dp > 1 and zero <= 2:
        terms.append(("gradient_reduce_bucket", reduce * p.grad))
        if zero >= 1:
            terms.append(
                ("parameter_allgather_bucket", min(s.allgather_bucket_elements, c.trainable) * p.param)
            )
    if zero == 3:
        # ZeRO-3 gathers one module's full weights and its gradient at a time (DeepSpeed's
        # estimator: 4 bytes x largest layer), and prefetches the next module's weights.
        terms.append(("zero3_gathered_module", (p.param + p.grad) * c.largest_module))
        terms.append(("zero3_prefetch_bucket", min(s.prefetch_bucket_elements, c.params) * p.param))
        if training:
            terms.append(("gradient_reduce_bucket", reduce * p.grad))
    return tuple(terms)


def optimizer_k(p: PrecisionBytes, zero: int) -> int:
    """K for a precision under a ZeRO stage: fp32 gains DeepSpeed's fp32 partition copy (4 bytes)
    once a ZeRO optimizer owns the weights (see the module docstring)."""
    if zero >= 1 and p.param == 4 and p.optimizer == 8:
        return 12
    return p.optimizer


def stage_model_states(
    ctx: ModelContext, c: StageCounts, dp: int, zero: int, offload: str
) -> tuple[int, int, int, int]:
    """(parameters, gradients, optimizer states) on the GPU and bytes moved to host memory.

    Trainable parameters follow the ZeRO table; frozen weights (LoRA base, frozen layers,
    inference) have no gradients or optimizer states and are sharded only by ZeRO-3.
    Offload (ZeRO-Offload / ZeRO-Infinity, as DeepSpeed's estimators count it): "optimizer" moves
    the optimizer states and, from stage 2, the gradient partition to the host, which also keeps
    an fp32 gradient copy for CPU-Adam; "all" (stage 3) moves the parameter partition too."""
    p = ctx.precision
    k = optimizer_k(p, zero)
    edp = max(1, dp // c.ep)  # expert-data-parallel ranks: those holding the same experts
    weights, grads, optimizer = zero_model_states(
        c.trainable - c.expert_trainable, dp, zero, k=k, param_bytes=p.param, grad_bytes=p.grad
    )
    if c.expert_trainable:
        ew, eg, eo = zero_model_states(
            c.expert_trainable, edp, zero, k=k, param_bytes=p.param, grad_bytes=p.grad
        )
        weights, grads, optimizer = weights + ew, grads + eg, optimizer + eo
    dense_frozen = c.frozen_bytes - c.expert_frozen_bytes
    if zero >= 3:
        weights += ceil_div(dense_frozen, dp) + ceil_div(c.expert_frozen_bytes, edp)
    else:
        weights += c.frozen_bytes
    host = 0
    if offload in ("optimizer", "all"):
        host += ceil_div((p.cpu_grad + k) * (c.trainable - c.expert_trainable), dp)
        host += ceil_div((p.cpu_grad + k) * c.expert_trainable, edp)
        optimizer = 0
        if zero >= 2:
            grads = 0
    if offload == "all":
        host += weights
        weights = 0
    return weights, grads, optimizer, host


def stage_breakdown(ctx: ModelContext, c: StageCounts, layout: Layout) -> tuple[MemoryBreakdown, int]:
    """Per-GPU memory of one stage under a layout, and the host bytes one GPU offloads."""
    weights, grads, optimizer, host = stage_model_states(ctx, c, layout.dp, layout.zero_stage, layout.offload)
    units = activation_units(ctx, c, layout.tp, layout.sequence_parallel, layout.checkpointing)
    activations: int | None = None
    if units is not None:
        in_flight = act.in_flight_micro_batches(c.stage, layout.pp, layout.grad_accum)
        activations = ceil(layout.micro_batch * (in_flight * units.per_in_flight + units.fixed))
    terms = overhead_terms(ctx, c, layout.dp, layout.zero_stage, layout.gpus)
    breakdown = MemoryBreakdown(weights, grads, optimizer, activations, sum(v for _, v in terms), terms)
    return breakdown, host


def cpu_memory_per_node(host_bytes_per_gpu: int, gpus_per_node: int) -> int:
    """Host memory the offloaded states need on one node: the worst GPU's share times the GPUs
    per node. DeepSpeed's estimators multiply by an extra 1.5 buffer factor; we do not (the
    pinned buffers are DeepSpeed's bucket sizes, counted on the GPU side)."""
    return host_bytes_per_gpu * gpus_per_node
