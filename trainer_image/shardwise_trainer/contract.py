"""The layout contract between the shardwise operator and this trainer (docs/layout-contract.md).

This module is the ONLY place on the trainer side that names the files, the ``layout.json`` keys
and the environment variables of the contract, with their defaults. It imports nothing but the
standard library (no torch, no deepspeed) so the operator's tests can import it to hold the pod
env and the ConfigMap the operator renders against it.

Rank order (the contract, identical to DeepSpeed's ``PipeModelDataParallelTopology`` with axes
``pipe, data, model``)::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so a tensor-parallel group is a run of ``tp`` contiguous ranks and stays inside one node.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from shardwise_trainer import capabilities

# --------------------------------------------------------------------------------------------
# Files (mounted from the ``<job>-layout`` ConfigMap)
# --------------------------------------------------------------------------------------------

#: Directory the operator mounts the ``<job>-layout`` ConfigMap at.
CONFIG_DIR: Final = "/etc/shardwise"
#: File name of the plan inside the ConfigMap.
LAYOUT_FILE_NAME: Final = "layout.json"
#: File name of the DeepSpeed config inside the ConfigMap (== ``layout["deepspeed"]``).
DS_CONFIG_FILE_NAME: Final = "ds_config.json"
#: The only ``layout.json`` version this trainer understands.
LAYOUT_VERSION: Final = 1

# --------------------------------------------------------------------------------------------
# Environment variables set by the operator on every trainer container
# --------------------------------------------------------------------------------------------

#: Path of ``layout.json``.
ENV_LAYOUT_FILE: Final = "SHARDWISE_LAYOUT_FILE"
#: Path of ``ds_config.json``; when unset the trainer uses ``layout["deepspeed"]``.
ENV_DS_CONFIG_FILE: Final = "SHARDWISE_DS_CONFIG_FILE"
#: Name of the ParallelTrainingJob (metric label ``job``).
ENV_JOB_NAME: Final = "SHARDWISE_JOB_NAME"
#: Namespace of the ParallelTrainingJob (metric label ``namespace``).
ENV_NAMESPACE: Final = "SHARDWISE_NAMESPACE"
#: Pod name, from the downward API (metric label ``pod``).
ENV_POD_NAME: Final = "SHARDWISE_POD_NAME"
#: Node name, from the downward API (metric label ``node``).
ENV_NODE_NAME: Final = "SHARDWISE_NODE_NAME"
#: This pod's node rank, 0 … nodes-1.
ENV_NODE_RANK: Final = "SHARDWISE_NODE_RANK"
#: Attempt number (0, 1, …); a restarted gang gets a new one.
ENV_ATTEMPT: Final = "SHARDWISE_ATTEMPT"
#: TCP port of the pod's per-rank stats endpoint (Prometheus text format); 0 / unset = off.
ENV_METRICS_PORT: Final = "SHARDWISE_METRICS_PORT"
#: Directory checkpoints are saved to and resumed from; empty = no checkpoints.
ENV_CHECKPOINT_DIR: Final = "SHARDWISE_CHECKPOINT_DIR"
#: Save a checkpoint every N optimizer steps (0 = only at the end, when a directory is set).
ENV_CHECKPOINT_EVERY: Final = "SHARDWISE_CHECKPOINT_EVERY"
#: Also save when this many minutes passed since the last checkpoint (0 = off; rank 0's clock).
ENV_CHECKPOINT_EVERY_MINUTES: Final = "SHARDWISE_CHECKPOINT_EVERY_MINUTES"
#: Keep the newest N complete checkpoints (older ones are deleted after each save).
ENV_CHECKPOINT_KEEP: Final = "SHARDWISE_CHECKPOINT_KEEP"
#: ``cpu`` on CPU-only nodes (tests, demo); unset on GPU nodes. Read by DeepSpeed itself.
ENV_DS_ACCELERATOR: Final = "DS_ACCELERATOR"

#: File the trainer writes its termination message to: the container's terminationMessagePath.
ENV_TERMINATION_LOG: Final = "SHARDWISE_TERMINATION_LOG"

#: From spec.model.path (docs/crd.md): a local directory holding a Hugging Face causal LM
#: (``config.json`` + weights from ``save_pretrained``) to train instead of the built-in model; same
#: as ``--hf-model DIR``. Needs ``transformers``; never downloads (docs/trainer.md). Empty = built-in.
ENV_HF_MODEL: Final = "SHARDWISE_HF_MODEL"
#: From spec.model.trustRemoteCode: ``true`` lets the trainer run modelling code shipped in the model
#: directory (``auto_map``, e.g. ChatGLM3); same as ``--trust-remote-code``. Never a default.
ENV_TRUST_REMOTE_CODE: Final = "SHARDWISE_TRUST_REMOTE_CODE"
#: From spec.output.path: directory the result is saved to in Hugging Face format.
ENV_OUTPUT_DIR: Final = "SHARDWISE_OUTPUT_DIR"

#: From spec.data (same as the flags of the same names, docs/trainer.md "Data"): the data file, its
#: format, the packing policy, the validation file / fraction, the evaluation interval and the chat
#: template file.
ENV_DATA_FILE: Final = "SHARDWISE_DATA"
ENV_DATA_FORMAT: Final = "SHARDWISE_DATA_FORMAT"
ENV_PACKING: Final = "SHARDWISE_PACKING"
ENV_VALIDATION_DATA: Final = "SHARDWISE_VALIDATION_DATA"
ENV_VALIDATION_FRACTION: Final = "SHARDWISE_VALIDATION_FRACTION"
ENV_EVAL_EVERY: Final = "SHARDWISE_EVAL_EVERY"
ENV_CHAT_TEMPLATE: Final = "SHARDWISE_CHAT_TEMPLATE"
#: Optional, never set by the operator: where tokenized records are cached (default
#: ``<checkpoint dir>/data-cache``, so a restart does not tokenize again).
ENV_DATA_CACHE_DIR: Final = "SHARDWISE_DATA_CACHE_DIR"

#: Every variable the operator sets (the operator's pod-env test checks this set).
OPERATOR_ENV: Final = (
    ENV_LAYOUT_FILE,
    ENV_DS_CONFIG_FILE,
    ENV_JOB_NAME,
    ENV_NAMESPACE,
    ENV_POD_NAME,
    ENV_NODE_NAME,
    ENV_NODE_RANK,
    ENV_ATTEMPT,
    ENV_METRICS_PORT,
    ENV_CHECKPOINT_DIR,
    ENV_CHECKPOINT_EVERY,
    ENV_CHECKPOINT_EVERY_MINUTES,
    ENV_CHECKPOINT_KEEP,
    ENV_TERMINATION_LOG,
    "SHARDWISE_POD_IP",  # ENV_POD_IP, defined below with its note
    ENV_HF_MODEL,
    ENV_TRUST_REMOTE_CODE,
    ENV_OUTPUT_DIR,
    ENV_DATA_FILE,
    ENV_DATA_FORMAT,
    ENV_PACKING,
    ENV_VALIDATION_DATA,
    ENV_VALIDATION_FRACTION,
    ENV_EVAL_EVERY,
    ENV_CHAT_TEMPLATE,
)

#: Defaults the trainer applies when a variable is unset (``None`` = no default: optional).
ENV_DEFAULTS: Final[Mapping[str, str | None]] = {
    ENV_LAYOUT_FILE: f"{CONFIG_DIR}/{LAYOUT_FILE_NAME}",
    ENV_DS_CONFIG_FILE: None,
    ENV_JOB_NAME: "",
    ENV_NAMESPACE: "",
    ENV_POD_NAME: "",
    ENV_NODE_NAME: "",
    ENV_NODE_RANK: "0",
    ENV_ATTEMPT: "0",
    ENV_METRICS_PORT: "0",
    ENV_CHECKPOINT_DIR: "",
    ENV_CHECKPOINT_EVERY: "0",
    ENV_CHECKPOINT_EVERY_MINUTES: "0",
    ENV_CHECKPOINT_KEEP: "2",
    ENV_TERMINATION_LOG: "",
    "SHARDWISE_POD_IP": "",
    ENV_HF_MODEL: "",
    ENV_TRUST_REMOTE_CODE: "false",
    ENV_OUTPUT_DIR: "",
    ENV_DATA_FILE: "",
    ENV_DATA_FORMAT: "auto",
    ENV_PACKING: "pack",
    ENV_VALIDATION_DATA: "",
    ENV_VALIDATION_FRACTION: "0",
    ENV_EVAL_EVERY: "0",
    ENV_CHAT_TEMPLATE: "",
}

#: Set by torchrun, never by the user (the CRD rejects them in the pod template).
TORCHRUN_ENV: Final = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
)

#: The pod IP (downward API ``status.podIP``): torchrun advertises it (``--local-addr``) and the
#: stats endpoint binds to it instead of all addresses — needed when several pods share one host,
#: as with the local node runner's 127.0.0.x pods.
ENV_POD_IP: Final = "SHARDWISE_POD_IP"

#: Test-only switch, off by default: ``<rank>:<factor>`` makes that rank's compute ``factor`` times
#: as long (extra matrix multiplications inside its forward, straggle.py). Never set by the operator.
ENV_TEST_SLOW_RANK: Final = "SHARDWISE_TEST_SLOW_RANK"
#: Test-only switch, off by default: ``<kind>@<rank>:<step>`` makes that rank raise, at the start
#: of that step, the error a real fault raises: ``oom`` (torch.OutOfMemoryError, as CUDA's
#: allocator does) or ``comm`` (torch.distributed.DistNetworkError, as a lost peer does).
ENV_TEST_FAULT: Final = "SHARDWISE_TEST_FAULT"

# --------------------------------------------------------------------------------------------
# layout.json keys (version 1)
# --------------------------------------------------------------------------------------------

K_VERSION: Final = "version"
K_MODEL: Final = "model"
K_MODEL_NAME: Final = "name"
K_MODEL_PARAMETERS: Final = "parameters"
K_ARCHITECTURE: Final = "architecture"
# model.architecture
K_FAMILY: Final = "family"
K_LAYERS: Final = "layers"
K_HIDDEN: Final = "hidden_size"
K_HEADS: Final = "heads"
K_KV_HEADS: Final = "kv_heads"
K_FFN_HIDDEN: Final = "ffn_hidden_size"
K_VOCAB: Final = "vocab_size"
K_MLP: Final = "mlp"
K_NORM: Final = "norm"
K_TIED: Final = "tied_embeddings"
K_DROPOUT: Final = "dropout"
K_POSITION: Final = "position_embedding"
K_MAX_SEQ: Final = "max_sequence_length"
K_QKV_BIAS: Final = "qkv_bias"
K_EXTRA_PARAMETERS: Final = "extra_parameters"
# training
K_TRAINING: Final = "training"
K_METHOD: Final = "method"
K_PRECISION: Final = "precision"
K_SEQ_LEN: Final = "sequence_length"
K_GLOBAL_BATCH: Final = "global_batch_size"
K_LORA_RANK: Final = "lora_rank"
K_LORA_TARGETS: Final = "lora_targets"
K_OPTIMIZER: Final = "optimizer"
K_LORA_ALPHA: Final = "lora_alpha"
K_LORA_DROPOUT: Final = "lora_dropout"
K_TRAINABLE_FRACTION: Final = "trainable_fraction"
K_FIRST_TRAINABLE: Final = "first_trainable_layer"
K_MODEL_SOURCE: Final = "model_source"
# layout
K_LAYOUT: Final = "layout"
K_TP: Final = "tp"
K_PP: Final = "pp"
K_DP: Final = "dp"
K_ZERO: Final = "zero_stage"
K_MICRO_BATCH: Final = "micro_batch"
K_GRAD_ACCUM: Final = "grad_accum"
K_CHECKPOINTING: Final = "checkpointing"
K_SEQUENCE_PARALLEL: Final = "sequence_parallel"
K_EP: Final = "ep"  # expert-parallel degree (MoE); absent = 1
K_SP: Final = "sp"  # Ulysses sequence-parallel degree; absent = 1
K_OFFLOAD: Final = "offload"
K_NODES: Final = "nodes"
K_GPUS_PER_NODE: Final = "gpus_per_node"
# ranks
K_RANKS: Final = "ranks"
K_ORDER: Final = "order"
K_STAGE_LAYERS: Final = "stage_layers"
# predicted
K_PREDICTED: Final = "predicted"
K_GPU_MEMORY: Final = "gpu_memory_bytes"
K_PER_STAGE: Final = "per_stage"
K_STAGE: Final = "stage"
K_MODEL_STATE_BYTES: Final = "model_state_bytes"
K_STEP_TIME: Final = "step_time_seconds"
# deepspeed
K_DEEPSPEED: Final = "deepspeed"

#: The rank order of the contract, slowest axis first.
RANK_ORDER: Final = ("pp", "dp", "tp")

# Allowed values (the trainer rejects anything else with a clear message).
MLP_KINDS: Final = ("swiglu", "gelu")
NORM_KINDS: Final = ("rmsnorm", "layernorm")
POSITION_KINDS: Final = ("rope", "learned")
PRECISIONS: Final = ("bf16", "fp16", "bf16-pure", "fp32")
CHECKPOINTING_KINDS: Final = ("none", "selective", "full")
OFFLOAD_KINDS: Final = ("none", "optimizer", "all")
#: Training methods this trainer runs (capabilities.TABLE says with which layouts; lora / qlora /
#: freeze need a pretrained Hugging Face model directory).
SUPPORTED_METHODS: Final = tuple(dict.fromkeys(c.method for c in capabilities.TABLE))


#: Termination-message lines the operator reads (lifecycle.py): the trainer's own exit code (torchrun
#: exits 1 for any failed worker) and the CamelCase reason the job fails with.
TERMINATION_EXIT_CODE: Final = "shardwise.dev/exit-code="
TERMINATION_REASON: Final = "shardwise.dev/reason="
#: On success: where the trainer saved its result (the job's status.outputPath).
TERMINATION_OUTPUT: Final = "shardwise.dev/output="
#: Whether another attempt of the same layout can succeed (``true`` / ``false``); the trainer's
#: word on its own failure, which the operator follows unless runPolicy's code lists say otherwise.
TERMINATION_RETRYABLE: Final = "shardwise.dev/retryable="
#: On a GPU out-of-memory: the bytes the failed attempt needed at least (the allocator's peak plus
#: the allocation that failed), the floor of the operator's out-of-memory re-plan.
TERMINATION_GPU_MEMORY_NEEDED: Final = "shardwise.dev/gpu-memory-needed-bytes="
#: Reasons of exit code 2 (bad input), the job's Failed condition reason.
REASON_INVALID_LAYOUT: Final = "InvalidLayout"
REASON_INVALID_MODEL: Final = "InvalidModel"
REASON_UNSUPPORTED: Final = "UnsupportedByRuntime"
#: The training data cannot be read (missing file, unknown format, a record without its fields).
REASON_INVALID_DATASET: Final = "InvalidDataset"
#: The latest checkpoint was written at a layout this trainer cannot convert to the current one
#: (another TP or PP degree, another method): resuming would mean starting at step 0.
REASON_INVALID_CHECKPOINT: Final = "InvalidCheckpoint"
#: Reasons of a failed run (failures.classify): exit code, reason and whether a retry can help.
EXIT_PROGRAM_ERROR: Final = 1
EXIT_BAD_INPUT: Final = 2
EXIT_TEMPORARY: Final = 75  # sysexits' EX_TEMPFAIL: a device or communication failure
REASON_GPU_OUT_OF_MEMORY: Final = "GpuOutOfMemory"
REASON_HOST_OUT_OF_MEMORY: Final = "HostOutOfMemory"
REASON_COMMUNICATION: Final = "CommunicationError"
REASON_DEVICE: Final = "DeviceError"
REASON_TRAINER_ERROR: Final = "TrainerError"


class ContractError(ValueError):
    """A layout file, an environment variable or the model does not fit the contract (exit 2);
    ``reason`` is the CamelCase reason the job fails with."""

    def __init__(self, message: str, reason: str = REASON_INVALID_LAYOUT) -> None:
        super().__init__(message)
        self.reason = reason


def termination_message(
    exit_code: int,
    reason: str,
    message: str,
    *,
    retryable: bool | None = None,
    gpu_memory_needed: int | None = None,
) -> str:
    """What the trainer writes to its terminationMessagePath (kubelet cap: 4096 bytes)."""
    text = f"{TERMINATION_EXIT_CODE}{exit_code}\n{TERMINATION_REASON}{reason}\n"
    if retryable is not None:
        text += f"{TERMINATION_RETRYABLE}{'true' if retryable else 'false'}\n"
    if gpu_memory_needed is not None:
        text += f"{TERMINATION_GPU_MEMORY_NEEDED}{gpu_memory_needed}\n"
    text += f"{message}\n"
    return text.encode()[:4096].decode(errors="ignore")


def success_message(output_path: str) -> str:
    """The termination message of a run that saved its result to ``output_path``."""
    return f"{TERMINATION_EXIT_CODE}0\n{TERMINATION_OUTPUT}{output_path}\n"


def write_termination_message(text: str, *, first_only: bool = False) -> None:
    """Leave ``text`` where the operator reads it (the pod's termination message); only when the
    operator named the file (never /dev/termination-log by default). With ``first_only`` an
    earlier message wins: the local rank that failed first names the cause, not the ranks that
    failed after it because it was gone."""
    path = env(ENV_TERMINATION_LOG)
    if not path:
        return
    try:
        if first_only and os.path.exists(path) and os.path.getsize(path) > 0:
            return
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:  # the message still is on stderr, the pod log
        print(f"shardwise-train: cannot write the termination message to {path}: {exc}", file=sys.stderr)


def env(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Value of contract variable ``name`` (from ``environ``, default ``os.environ``) or its default."""
    source = os.environ if environ is None else environ
    if name not in ENV_DEFAULTS:
        raise KeyError(f"{name} is not a variable of the layout contract")
    value = source.get(name)
    return value if value not in (None, "") else ENV_DEFAULTS[name]


def env_int(name: str, environ: Mapping[str, str] | None = None) -> int:
    """Integer value of a contract variable; a clear error when it is not an integer."""
    raw = env(name, environ) or "0"
    try:
        return int(raw)
    except ValueError as exc:
        raise ContractError(f"environment variable {name}={raw!r} is not an integer") from exc


def rank_of(pp_rank: int, dp_rank: int, tp_rank: int, *, tp: int, dp: int) -> int:
    """Global rank of coordinates (pp, dp, tp) in the contract's order (TP fastest)."""
    return pp_rank * (dp * tp) + dp_rank * tp + tp_rank


def coords_of(rank: int, *, tp: int, dp: int) -> tuple[int, int, int]:
    """(pp_rank, dp_rank, tp_rank) of a global rank; inverse of :func:`rank_of`."""
    return rank // (dp * tp), (rank // tp) % dp, rank % tp


@dataclass(frozen=True)
class Architecture:
    """``layout["model"]["architecture"]`` as typed fields."""

    family: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    mlp: str
    norm: str
    tied_embeddings: bool
    dropout: bool
    position_embedding: str
    max_sequence_length: int
    qkv_bias: bool
    extra_parameters: int

    @property
    def head_dim(self) -> int:
        """Per-head width (hidden_size / heads)."""
        return self.hidden_size // self.heads


@dataclass(frozen=True)
class Layout:
    """The parts of ``layout.json`` the trainer runs; ``raw`` keeps the whole document."""

    raw: Mapping[str, Any]
    architecture: Architecture
    precision: str
    method: str
    sequence_length: int
    global_batch_size: int
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch: int
    grad_accum: int
    checkpointing: str
    offload: str
    stage_layers: tuple[tuple[int, int], ...]
    deepspeed: Mapping[str, Any]
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    first_trainable_layer: int = 0
    sequence_parallel: bool = False
    ep: int = 1
    #: Ulysses sequence parallelism: ``sp`` consecutive ranks share each sample, one slice of its
    #: sequence each (attention heads exchanged by all-to-all); DP replicas are groups of ``sp``.
    sp: int = 1

    @property
    def world_size(self) -> int:
        """Number of ranks the layout needs (tp * sp * pp * dp)."""
        return self.tp * self.sp * self.pp * self.dp

    def predicted_model_state_bytes(self, stage: int) -> int | None:
        """``predicted.per_stage[stage].model_state_bytes`` per GPU, or None when absent."""
        per_stage = (self.raw.get(K_PREDICTED) or {}).get(K_PER_STAGE) or []
        for entry in per_stage:
            if int(entry.get(K_STAGE, -1)) == stage and K_MODEL_STATE_BYTES in entry:
                return int(entry[K_MODEL_STATE_BYTES])
        return None


def _req(doc: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in doc or doc[key] is None:
        raise ContractError(f"layout.json: missing {where}.{key}")
    return doc[key]


def _choice(value: str, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ContractError(f"layout.json: {where}={value!r}, expected one of {', '.join(allowed)}")
    return value


def parse_layout(doc: Mapping[str, Any]) -> Layout:
    """Validate a ``layout.json`` document (version 1) and return the typed :class:`Layout`."""
    version = doc.get(K_VERSION)
    if version != LAYOUT_VERSION:
        raise ContractError(f"layout.json: version {version!r} is not supported (expected {LAYOUT_VERSION})")
    model = _req(doc, K_MODEL, "")
    arch_doc = model.get(K_ARCHITECTURE)
    if not arch_doc:
        raise ContractError(
            "layout.json: model.architecture is null (the job gave only a parameter count); the "
            "trainer needs an architecture to build the model"
        )
    a = "model.architecture"
    heads = int(_req(arch_doc, K_HEADS, a))
    hidden = int(_req(arch_doc, K_HIDDEN, a))
    arch = Architecture(
        family=str(arch_doc.get(K_FAMILY, "custom")),
        layers=int(_req(arch_doc, K_LAYERS, a)),
        hidden_size=hidden,
        heads=heads,
        kv_heads=int(arch_doc.get(K_KV_HEADS) or heads),
        ffn_hidden_size=int(_req(arch_doc, K_FFN_HIDDEN, a)),
        vocab_size=int(_req(arch_doc, K_VOCAB, a)),
        mlp=_choice(str(arch_doc.get(K_MLP, "swiglu")), MLP_KINDS, f"{a}.mlp"),
        norm=_choice(str(arch_doc.get(K_NORM, "rmsnorm")), NORM_KINDS, f"{a}.norm"),
        tied_embeddings=bool(arch_doc.get(K_TIED, False)),
        dropout=bool(arch_doc.get(K_DROPOUT, False)),
        position_embedding=_choice(
            str(arch_doc.get(K_POSITION, "rope")), POSITION_KINDS, f"{a}.position_embedding"
        ),
        max_sequence_length=int(arch_doc.get(K_MAX_SEQ) or 0),
        qkv_bias=bool(arch_doc.get(K_QKV_BIAS, False)),
        extra_parameters=int(arch_doc.get(K_EXTRA_PARAMETERS) or 0),
    )
    if hidden % heads:
        raise ContractError(f"layout.json: hidden_size {hidden} is not a multiple of heads {heads}")
    if heads % arch.kv_heads:
        raise ContractError(f"layout.json: heads {heads} is not a multiple of kv_heads {arch.kv_heads}")

    training = _req(doc, K_TRAINING, "")
    lay = _req(doc, K_LAYOUT, "")
    tp, pp, dp = (
        int(_req(lay, K_TP, "layout")),
        int(_req(lay, K_PP, "layout")),
        int(_req(lay, K_DP, "layout")),
    )
    for name, divisor in (
        ("heads", arch.heads),
        ("kv_heads", arch.kv_heads),
        ("vocab_size", arch.vocab_size),
    ):
        if divisor % tp:
            raise ContractError(f"layout.json: {name}={divisor} is not divisible by tp={tp}")
    if arch.ffn_hidden_size % tp:
        raise ContractError(f"layout.json: ffn_hidden_size={arch.ffn_hidden_size} not divisible by tp={tp}")

    ranks = doc.get(K_RANKS) or {}
    order = tuple(ranks.get(K_ORDER) or RANK_ORDER)
    if order != RANK_ORDER:
        raise ContractError(
            f"layout.json: ranks.order={list(order)} but this trainer runs {list(RANK_ORDER)}"
        )
    stage_layers_doc = ranks.get(K_STAGE_LAYERS)
    if stage_layers_doc:
        stage_layers = tuple((int(s[0]), int(s[1])) for s in stage_layers_doc)
    else:  # uniform split, the remainder on the first stages
        base, rem = divmod(arch.layers, pp)
        bounds, start = [], 0
        for s in range(pp):
            stop = start + base + (1 if s < rem else 0)
            bounds.append((start, stop))
            start = stop
        stage_layers = tuple(bounds)
    if len(stage_layers) != pp or stage_layers[0][0] != 0 or stage_layers[-1][1] != arch.layers:
        raise ContractError(
            f"layout.json: ranks.stage_layers={[list(s) for s in stage_layers]} does not cover "
            f"layers 0..{arch.layers} in {pp} stages"
        )
    for (_, stop), (start, _) in itertools.pairwise(stage_layers):
        if stop != start:
            raise ContractError("layout.json: ranks.stage_layers are not contiguous")

    method = str(training.get(K_METHOD, "full"))
    if method not in SUPPORTED_METHODS:
        raise ContractError(f"layout.json: training.method={method!r}; this trainer runs {SUPPORTED_METHODS}")
    lora_rank = int(training.get(K_LORA_RANK) or 0)
    lora_targets = tuple(str(t) for t in training.get(K_LORA_TARGETS) or ())
    if method in ("lora", "qlora") and (lora_rank <= 0 or not lora_targets):
        raise ContractError(f"layout.json: method {method} needs training.lora_rank > 0 and lora_targets")
    lora_alpha = float(training.get(K_LORA_ALPHA) or 2 * lora_rank)
    first_trainable = int(training.get(K_FIRST_TRAINABLE) or 0)
    if not 0 <= first_trainable < max(1, arch.layers):
        raise ContractError(
            f"layout.json: training.first_trainable_layer={first_trainable} outside 0..{arch.layers - 1}"
        )
    layout = Layout(
        raw=doc,
        architecture=arch,
        precision=_choice(str(training.get(K_PRECISION, "bf16")), PRECISIONS, "training.precision"),
        method=method,
        sequence_length=int(_req(training, K_SEQ_LEN, "training")),
        global_batch_size=int(_req(training, K_GLOBAL_BATCH, "training")),
        tp=tp,
        pp=pp,
        dp=dp,
        zero_stage=int(lay.get(K_ZERO, 0)),
        micro_batch=int(_req(lay, K_MICRO_BATCH, "layout")),
        grad_accum=int(lay.get(K_GRAD_ACCUM, 1)),
        checkpointing=_choice(
            str(lay.get(K_CHECKPOINTING, "none")), CHECKPOINTING_KINDS, "layout.checkpointing"
        ),
        offload=_choice(str(lay.get(K_OFFLOAD, "none")), OFFLOAD_KINDS, "layout.offload"),
        stage_layers=stage_layers,
        deepspeed=dict(doc.get(K_DEEPSPEED) or {}),
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        lora_alpha=lora_alpha,
        lora_dropout=float(training.get(K_LORA_DROPOUT) or 0.0),
        first_trainable_layer=first_trainable,
        sequence_parallel=bool(lay.get(K_SEQUENCE_PARALLEL, False)),
        ep=int(lay.get(K_EP) or 1),
        sp=int(lay.get(K_SP) or 1),
    )
    _check_sequence_parallel(layout)
    if layout.micro_batch * layout.grad_accum * dp != layout.global_batch_size:
        raise ContractError(
            f"layout.json: micro_batch {layout.micro_batch} * grad_accum {layout.grad_accum} * dp {dp} "
            f"!= global_batch_size {layout.global_batch_size}"
        )
    if layout.zero_stage not in (0, 1, 2, 3):
        raise ContractError(f"layout.json: zero_stage={layout.zero_stage} (expected 0..3)")
    if pp > 1 and layout.zero_stage > 1:
        raise ContractError(
            f"layout.json: pp={pp} with zero_stage={layout.zero_stage}: DeepSpeed pipeline parallelism "
            "supports ZeRO stage 0 or 1 only"
        )
    return layout


def _check_sequence_parallel(layout: Layout) -> None:
    """Ulysses' divisibility rules: each rank holds sequence / sp tokens and heads / sp heads."""
    sp, arch = layout.sp, layout.architecture
    if sp < 1:
        raise ContractError(f"layout.json: sp={sp} (expected >= 1)")
    if sp == 1:
        return
    problems = []
    if layout.sequence_length % sp:
        problems.append(f"training.sequence_length={layout.sequence_length} is not a multiple of sp")
    if arch.heads % sp:
        problems.append(f"the model's {arch.heads} attention heads do not split into sp groups")
    if arch.kv_heads % sp and sp % arch.kv_heads:
        problems.append(
            f"the model's {arch.kv_heads} key/value heads neither split into sp groups nor divide sp"
        )
    if problems:
        raise ContractError(f"layout.json: sp={sp}: " + "; ".join(problems))


def runtime_refusal(layout: Layout, *, pretrained: bool) -> str | None:
    """Why this trainer cannot run ``layout`` (capabilities.TABLE), or None."""
    return capabilities.refusal(
        method=layout.method,
        # What this run has, not what the method wants: lora without a model dir is refused.
        model=capabilities.PRETRAINED if pretrained else capabilities.BUILTIN,
        tp=layout.tp,
        pp=layout.pp,
        sequence_parallel=layout.sequence_parallel,
        zero_stage=layout.zero_stage,
        offload=layout.offload,
        expert=layout.ep,
        family=layout.architecture.family,
        vision_tower=layout.architecture.extra_parameters > 0,
        sp=layout.sp,
    )


def load_layout(path: str | os.PathLike[str]) -> Layout:
    """Read and validate ``layout.json`` at ``path``."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ContractError(f"layout file {path} does not exist (set --layout or {ENV_LAYOUT_FILE})") from exc
    except json.JSONDecodeError as exc:
        raise ContractError(f"layout file {path} is not JSON: {exc}") from exc
    return parse_layout(doc)


def load_ds_config(layout: Layout, path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The DeepSpeed config: ``ds_config.json`` at ``path`` when given, else ``layout["deepspeed"]``."""
    if path:
        try:
            return dict(json.loads(Path(path).read_text()))
        except FileNotFoundError as exc:
            raise ContractError(f"DeepSpeed config {path} does not exist ({ENV_DS_CONFIG_FILE})") from exc
    return dict(layout.deepspeed)
