"""Explained step-time estimate: compute at a size-dependent fraction of peak, TP / PP / DP traffic,
bubble, offload, expert all-to-all.

Every term is reported separately, as exposed: DP / ZeRO traffic only beyond the compute that
hides it (planner/overlap.py), TP / PP traffic and the bubble in full. It orders layouts and is
calibrated against published runs (docs/planner.md); it does not promise wall-clock time.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.planner import moe
from shardwise.planner.layout import Layout
from shardwise.planner.memory import ModelContext, StageCounts
from shardwise.planner.overlap import DataParallelTraffic, matmul_efficiency


@dataclass(frozen=True, slots=True)
class StepTime:
    """Seconds per optimizer step, by cause."""

    compute: float
    pipeline_bubble: float
    tensor_parallel: float
    pipeline_p2p: float
    data_parallel: float
    offload: float
    expert_all_to_all: float = 0.0

    @property
    def total(self) -> float:
        return (
            self.compute
            + self.pipeline_bubble
            + self.tensor_parallel
            + self.pipeline_p2p
            + self.data_parallel
            + self.offload
            + self.expert_all_to_all
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "compute": self.compute,
            "pipeline_bubble": self.pipeline_bubble,
            "tensor_parallel": self.tensor_parallel,
            "pipeline_p2p": self.pipeline_p2p,
            "data_parallel": self.data_parallel,
            "offload": self.offload,
            "expert_all_to_all": self.expert_all_to_all,
            "total": self.total,
        }


def step_flops(ctx: ModelContext, checkpointing: str) -> float:
    """Model FLOPs of one step (Narayanan et al. 2021, eq. 3; memory-model.md §4).

    Forward FLOPs per token: L·(2·W + 4·s·h) + 2·h·v, with W the matmul weights of a layer
    (12h² for GPT: this is 24·s·h²·L·(1 + s/(6h)) + 2·s·h·v per sample, Narayanan's forward)
    and 4·s·h the two attention matmuls. Training = 3x forward (72 in their formula); full
    recompute adds a forward (96); selective recompute adds the attention matmuls again.
    LoRA / QLoRA skip the weight-gradient half of the backward (2x forward); freeze runs the
    backward only through the trained layers; inference is one forward. Without a shape the
    forward is 2·P per token."""
    arch = ctx.arch
    tokens = float(ctx.global_batch * ctx.seq)
    if arch is None:
        forward = 2.0 * ctx.request.model.parameters
        layer_fwd = attention = 0.0
        layers = 0
    else:
        layers = arch.layers
        # QK^T and attention-over-V: 2·s·(Q width + V width) per token (4·s·h for a Llama block);
        # a sliding-window layer attends to at most its window.
        widths = 2.0 * (arch.q_dim + arch.attention_value_dim)
        windowed = min(ctx.seq, arch.sliding_window) if arch.sliding_window else ctx.seq
        attention = widths * ((layers - arch.sliding_window_layers) * ctx.seq
                              + arch.sliding_window_layers * windowed) / layers  # fmt: skip
        # MoE: the top-k routed experts a token meets, not every expert (active parameters).
        layer_fwd = 2.0 * arch.matmul_weights_all_layers / layers + attention
        forward = layers * layer_fwd + 2.0 * arch.hidden_size * arch.vocab_size
    method = ctx.method
    if method == "inference":
        return forward * tokens
    if method in ("lora", "qlora"):
        total = 2.0 * forward
    elif method == "freeze" and layers:
        trained = (layers - ctx.first_trainable) / layers
        total = forward + 2.0 * trained * forward
    else:
        total = 3.0 * forward
    if checkpointing == "full":
        total += layers * layer_fwd if layers else forward
    elif checkpointing == "selective":
        total += layers * attention
    return total * tokens


def _ring_allreduce(bytes_: float, n: int, bandwidth: float) -> float:
    """Ring all-reduce time: each rank sends 2(n-1)/n of the buffer."""
    return 0.0 if n <= 1 else 2.0 * (n - 1) / n * bytes_ / bandwidth


def _ring_gather(bytes_: float, n: int, bandwidth: float) -> float:
    """All-gather or reduce-scatter: (n-1)/n of the full buffer per rank."""
    return 0.0 if n <= 1 else (n - 1) / n * bytes_ / bandwidth


@dataclass(frozen=True, slots=True)
class StageMaxima:
    """The busiest stage's numbers (the pipeline runs at the pace of its slowest stage)."""

    layers: int
    trainable: int
    frozen_bytes: int
    moe_layers: int = 0
    expert_trainable: int = 0  # part of `trainable` reduced over the dp / ep expert-data-parallel group
    ep: int = 1


def stage_maxima(counts: tuple[StageCounts, ...]) -> StageMaxima:
    return StageMaxima(
        layers=max(c.last_layer - c.first_layer for c in counts),
        trainable=max(c.trainable for c in counts),
        frozen_bytes=max(c.frozen_bytes for c in counts),
        moe_layers=max(c.active_moe_layers for c in counts),
        expert_trainable=max(c.expert_trainable for c in counts),
        ep=counts[0].ep,
    )


@dataclass(frozen=True, slots=True)
class StepTimeModel:
    """Step time of one layout family as a function of the micro-batch b and accumulation m
    (b·m is fixed by the global batch): every term is a constant, a multiple of m, of 1/m or of
    b·(m + p - 2). Built once per family, evaluated per micro-batch by the search."""

    compute: float
    bubble_times_m: float  # bubble = compute·(p - 1)/m
    tensor: float  # m·b is constant, so TP traffic per step is too
    p2p_per_sample_transfer: float  # x b·(m + p - 2)
    pp: int
    data: DataParallelTraffic  # exposed part depends on m (overlap.py)
    backward_fraction: float  # share of compute that is backward (what hides gradient reduction)
    offload_const: float
    offload_per_micro_batch: float  # x m
    all_to_all: float = 0.0  # MoE token routing, constant per step like TP traffic

    def total(self, micro: int, accum: int) -> float:
        return (
            self.all_to_all
            + self.compute
            + self.bubble_times_m / accum
            + self.tensor
            + self.p2p_per_sample_transfer * micro * (accum + self.pp - 2)
            + self.data.exposed(self.compute, self.backward_fraction, accum)
            + self.offload_const
            + self.offload_per_micro_batch * accum
        )

    def at(self, micro: int, accum: int) -> StepTime:
        return StepTime(
            compute=self.compute,
            pipeline_bubble=self.bubble_times_m / accum,
            tensor_parallel=self.tensor,
            pipeline_p2p=self.p2p_per_sample_transfer * micro * (accum + self.pp - 2),
            data_parallel=self.data.exposed(self.compute, self.backward_fraction, accum),
            offload=self.offload_const + self.offload_per_micro_batch * accum,
            expert_all_to_all=self.all_to_all,
        )


def step_time_model(ctx: ModelContext, layout: Layout, worst: StageMaxima, flops: float) -> StepTimeModel:
    """The explained step-time model of `layout`'s family (its micro-batch and accumulation are
    ignored); `worst` holds the busiest stage's counts, `flops` the step's model FLOPs."""
    request = ctx.request
    gpu = request.cluster.gpu
    settings = request.settings
    arch = ctx.arch
    p = ctx.precision
    training = ctx.method != "inference"
    gpus_per_node = request.cluster.gpus_per_node
    per_replica = ctx.global_batch // layout.dp  # = micro-batch x accumulation
    compute = flops / (layout.gpus * gpu.peak_flops * matmul_efficiency(arch, settings))
    # Backward share of the compute: 2 of 3 forward-equivalents, 3 of 4 with full recompute
    # (the recomputed forward runs inside the backward); LoRA's backward skips weight gradients.
    if not training:
        backward_fraction = 0.0
    elif ctx.method in ("lora", "qlora"):
        backward_fraction = 2 / 3 if layout.checkpointing == "full" else 1 / 2
    else:
        backward_fraction = 3 / 4 if layout.checkpointing == "full" else 2 / 3
    # 1F1B bubble: (p - 1)/m of the ideal time (Narayanan et al. 2021 §2.2.1).
    bubble_times_m = compute * (layout.pp - 1)

    tensor = p2p = 0.0
    if arch is not None:
        sample = float(ctx.seq * arch.hidden_size * p.activation)  # one sample's hidden states
        # Megatron TP: 2 all-reduces forward, 2 backward per layer (sequence parallelism swaps
        # each for a reduce-scatter + all-gather, same volume); full recompute repeats the
        # forward's. Per step that is m·b = per_replica samples through the busiest stage.
        per_layer = 2 if not training else (6 if layout.checkpointing == "full" else 4)
        tensor = (
            per_replica
            * worst.layers
            * per_layer
            * _ring_allreduce(sample, layout.tp, gpu.intra_node_bandwidth)
        )
        if layout.pp > 1:
            # Activations (and their gradients) cross each stage boundary; on the critical path
            # m + p - 2 transfers of one micro-batch.
            # 1F1B runs at the pace of its slowest link: once the pipeline spans nodes, some
            # stage boundary is an inter-node hop (every one when a stage fills a node).
            crosses = layout.gpus > gpus_per_node
            bw = settings.inter_node_bandwidth if crosses else gpu.intra_node_bandwidth
            shard = sample / (layout.tp if layout.sequence_parallel else 1)
            p2p = (2 if training else 1) * shard / bw

    all_to_all = 0.0
    if arch is not None and arch.moe and layout.ep > 1:
        # The EP group is ep consecutive data-parallel ranks: inside a node while tp·ep fits in it.
        bw = (
            settings.inter_node_bandwidth
            if layout.tp * layout.ep > gpus_per_node
            else gpu.intra_node_bandwidth
        )
        passes = 1 if not training else (3 if layout.checkpointing == "full" else 2)
        all_to_all = moe.all_to_all_seconds(
            arch, ctx.seq, per_replica, worst.moe_layers, ep=layout.ep, passes=passes,
            act_bytes=p.activation, bandwidth=bw,
        )  # fmt: skip

    data_const = data_per_mb = data_after = bucket = 0.0
    n = layout.dp
    if training and n > 1:
        bw = settings.inter_node_bandwidth if layout.tp * n > gpus_per_node else gpu.intra_node_bandwidth
        # Expert gradients are reduced over the dp / ep ranks holding the same experts only: their
        # bytes count with that smaller group's ring factor, (edp - 1)/edp instead of (n - 1)/n.
        edp = max(1, n // layout.ep)
        expert_scale = ((edp - 1) / edp) / ((n - 1) / n) if edp > 1 else 0.0
        trainable = worst.trainable - worst.expert_trainable + expert_scale * worst.expert_trainable
        grads = float(trainable * p.grad)
        weights = float(trainable * p.param + (worst.frozen_bytes if layout.zero_stage == 3 else 0))
        if layout.zero_stage <= 1:
            data_const = _ring_allreduce(grads, n, bw)  # once per step, at the accumulation boundary
            bucket = _ring_allreduce(min(grads, settings.reduce_bucket_elements * p.grad), n, bw)
        elif layout.zero_stage == 2:
            # Reduce-scatter every micro-batch, all-gather the updated weights once.
            data_per_mb = _ring_gather(grads, n, bw)
            data_after = _ring_gather(weights, n, bw)
            bucket = _ring_gather(min(grads, settings.reduce_bucket_elements * p.grad), n, bw)
        else:
            # ZeRO-3: gather weights for forward and backward and reduce-scatter gradients, every
            # micro-batch (1.5x plain DP per micro-batch, ZeRO paper §7.2.2).
            data_per_mb = 2 * _ring_gather(weights, n, bw) + _ring_gather(grads, n, bw)
            bucket = _ring_gather(min(weights, settings.prefetch_bucket_elements * p.param), n, bw)

    offload_const = offload_per_mb = 0.0
    if layout.offload != "none" and training:
        shard_params = worst.trainable / n
        # Gradients down to the host, updated weights back up, and CPU-Adam on the node's cores.
        offload_const = shard_params * (p.grad + p.param) / gpu.host_bandwidth
        offload_const += shard_params * gpus_per_node / settings.cpu_optimizer_params_per_second
        if layout.offload == "all":
            # ZeRO-Infinity: the weight partition crosses PCIe for forward and backward each micro-batch.
            offload_per_mb = 2 * (worst.trainable * p.param + worst.frozen_bytes) / n / gpu.host_bandwidth
    return StepTimeModel(
        compute,
        bubble_times_m,
        tensor,
        p2p,
        layout.pp,
        DataParallelTraffic(data_const, data_after, data_per_mb, bucket, layout.zero_stage == 3),
        backward_fraction,
        offload_const,
        offload_per_mb,
        all_to_all,
    )


def step_time(ctx: ModelContext, layout: Layout, worst: StageMaxima, flops: float) -> StepTime:
    """Explained step time for a layout; `worst` holds the busiest stage's counts."""
    return step_time_model(ctx, layout, worst, flops).at(layout.micro_batch, layout.grad_accum)
