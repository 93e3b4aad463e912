"""The planner's input: model, training settings, pins, cluster and the stated assumptions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shardwise.planner import capabilities
from shardwise.planner.activations import CHECKPOINTING, Checkpointing
from shardwise.planner.architecture import ModelSpec
from shardwise.planner.errors import PlanInputError
from shardwise.planner.gpus import GpuSpec
from shardwise.planner.units import GIB, MIB

Method = Literal["full", "lora", "qlora", "freeze", "inference"]
Precision = Literal["bf16", "fp16", "bf16-pure", "fp32"]
Offload = Literal["none", "optimizer", "all"]
METHODS: tuple[Method, ...] = ("full", "lora", "qlora", "freeze", "inference")
PRECISIONS: tuple[Precision, ...] = ("bf16", "fp16", "bf16-pure", "fp32")
OFFLOADS: tuple[Offload, ...] = ("none", "optimizer", "all")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Sequence length when the request gives none: the architecture's maximum, capped here (a
# 32K-context model is not usually fine-tuned at 32K by default).
DEFAULT_SEQUENCE_LENGTH = 4096


@dataclass(frozen=True, slots=True)
class TrainingSettings:
    """What the run does; sequence_length 0 = min(architecture maximum, 4096)."""

    method: Method = "full"
    precision: Precision = "bf16"
    sequence_length: int = 0
    global_batch_size: int | None = None  # None = one sample per GPU used (stated default)
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o")
    lora_alpha: float | None = None  # None = 2 x rank (LLaMA-Factory's default)
    lora_dropout: float = 0.0
    trainable_fraction: float = 0.1  # freeze: share of the (last) transformer layers trained
    optimizer: str = "adamw"
    learning_rate: float = 1e-5  # AdamW peak learning rate, written into the DeepSpeed config
    # The job trains pretrained weights (a Hugging Face model directory). LoRA / QLoRA / freeze
    # always do; a full fine-tune does when the job names a model directory.
    pretrained: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PlanInputError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise PlanInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.sequence_length < 0:
            raise PlanInputError(f"sequence length must be positive, got {self.sequence_length}")
        if self.global_batch_size is not None and self.global_batch_size <= 0:
            raise PlanInputError(f"global batch size must be positive, got {self.global_batch_size}")
        if self.lora_rank <= 0:
            raise PlanInputError(f"LoRA rank must be positive, got {self.lora_rank}")
        for target in self.lora_targets:
            if target not in LORA_TARGETS:
                raise PlanInputError(f"unknown LoRA target {target!r} (one of {', '.join(LORA_TARGETS)})")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise PlanInputError(f"LoRA alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise PlanInputError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.learning_rate <= 1:
            raise PlanInputError(f"learning rate must be in (0, 1], got {self.learning_rate}")
        if not 0 < self.trainable_fraction <= 1:
            raise PlanInputError(f"trainable fraction must be in (0, 1], got {self.trainable_fraction}")

    @property
    def model_source(self) -> str:
        """``builtin`` or ``pretrained``: the row of the trainer's capability table that applies."""
        return capabilities.model_source_for(self.method, self.pretrained)

    @property
    def effective_lora_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank


@dataclass(frozen=True, slots=True)
class Pins:
    """Knobs the user fixed; None = planned. A request with every knob pinned is evaluated only."""

    tp: int | None = None
    pp: int | None = None
    zero_stage: int | None = None
    micro_batch: int | None = None
    checkpointing: Checkpointing | None = None
    sequence_parallel: bool | None = None
    offload: Offload | None = None
    expert: int | None = None  # expert-parallel degree (MoE models)

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "micro_batch", "expert"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise PlanInputError(f"{name} must be positive, got {value}")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise PlanInputError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.checkpointing is not None and self.checkpointing not in CHECKPOINTING:
            raise PlanInputError(f"checkpointing must be none, selective or full, got {self.checkpointing!r}")
        if self.offload is not None and self.offload not in OFFLOADS:
            raise PlanInputError(f"offload must be none, optimizer or all, got {self.offload!r}")


@dataclass(frozen=True, slots=True)
class Cluster:
    """GPUs available: nodes x gpus_per_node of one GPU type; node (host) memory when known."""

    nodes: int
    gpus_per_node: int
    gpu: GpuSpec
    node_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.nodes <= 0 or self.gpus_per_node <= 0:
            raise PlanInputError(
                f"nodes and GPUs per node must be positive, got {self.nodes} x {self.gpus_per_node}"
            )
        if self.gpu.memory_bytes <= 0:
            raise PlanInputError(f"GPU memory must be positive, got {self.gpu.memory_bytes}")

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True, slots=True)
class PlannerSettings:
    """Every assumption the estimates rest on, stated and overridable (no hidden fudge factors)."""

    # Step time: fraction of the GPU's peak dense 16-bit FLOP/s large matmuls reach, and the hidden
    # size at which they reach half of it (planner/overlap.py; fitted to Megatron-LM's A100 runs,
    # tests/unit/test_planner_calibration.py).
    mfu: float = 0.61
    matmul_half_size: float = 800.0
    # Inter-node bandwidth per GPU, bytes/s, one direction (default one 100 Gb/s NIC per GPU).
    inter_node_bandwidth: float = 100e9 / 8
    # DeepSpeed CPU-Adam throughput per node when the optimizer is offloaded (parameters/s).
    cpu_optimizer_params_per_second: float = 2e9
    # Framework overhead per GPU, explicit terms: CUDA context + cuBLAS/cuDNN workspaces and
    # kernels, and NCCL communicator buffers (only when more than one GPU takes part).
    cuda_context_bytes: int = 1 * GIB
    nccl_buffer_bytes: int = 512 * MIB
    # DeepSpeed communication buckets, in elements; also written into the DeepSpeed config so the
    # memory they take here is the memory they take in the run.
    reduce_bucket_elements: int = 50_000_000
    allgather_bucket_elements: int = 50_000_000
    prefetch_bucket_elements: int = 50_000_000
    # How many next-best layouts a result keeps.
    alternatives: int = 5
    # Plan only what shardwise's trainer runs (capabilities.TABLE). False plans every layout
    # DeepSpeed allows: the memory model's own tests, and what-if studies for another trainer.
    respect_runtime: bool = True
    # Measured / predicted per-GPU peak of an earlier attempt that ran out of memory (the
    # operator's out-of-memory re-plan): predictions are taken as this much too low, so a layout
    # fits when predicted x correction <= GPU memory. 1.0 = trust the memory model.
    memory_correction: float = 1.0
    # Plan expert parallelism even though the trainer does not run it yet (`shardwise plan`: the
    # result says so in a note; the operator keeps this off and refuses EP > 1 at admission).
    plan_expert_parallel_beyond_runtime: bool = False

    def __post_init__(self) -> None:
        if not 1.0 <= self.memory_correction <= 100.0:
            raise PlanInputError(f"memory correction must be in [1, 100], got {self.memory_correction}")


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """Everything plan() needs; built by shardwise.jobspec from a manifest or by the CLI."""

    model: ModelSpec
    cluster: Cluster
    training: TrainingSettings = field(default_factory=TrainingSettings)
    pins: Pins = field(default_factory=Pins)
    settings: PlannerSettings = field(default_factory=PlannerSettings)

    @property
    def sequence_length(self) -> int:
        if self.training.sequence_length:
            return self.training.sequence_length
        arch = self.model.architecture
        if arch is None:
            return DEFAULT_SEQUENCE_LENGTH
        return min(arch.max_sequence_length, DEFAULT_SEQUENCE_LENGTH)

    @property
    def usable_gpu_memory(self) -> int:
        """GPU memory a layout's prediction may fill: the GPU's, divided by the memory correction."""
        return int(self.cluster.gpu.memory_bytes / self.settings.memory_correction)

    @property
    def global_batch_size(self) -> int:
        """The global batch; default one sample per GPU, so every DP degree divides it."""
        if self.training.global_batch_size is not None:
            return self.training.global_batch_size
        return self.cluster.total_gpus
