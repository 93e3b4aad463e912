"""ParallelTrainingJob spec dict (docs/job-spec.md names) -> planner PlanRequest; pure, no I/O."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, cast

from shardwise.planner import (
    Architecture,
    Cluster,
    GpuSpec,
    ModelSpec,
    Pins,
    PlannerSettings,
    PlanRequest,
    TrainingSettings,
    gpu,
    preset,
)
from shardwise.planner.errors import PlanInputError
from shardwise.planner.request import LORA_TARGETS
from shardwise.planner.units import parse_count, parse_size
from shardwise.storage_spec import storage_from_spec

API_VERSION = "shardwise.dev/v1alpha1"
KIND = "ParallelTrainingJob"
# With only a GPU total, nodes are filled up to this many GPUs (the usual 8-GPU server).
DEFAULT_GPUS_PER_NODE = 8

_ARCH_FIELDS = {
    "layers": "layers",
    "hiddenSize": "hidden_size",
    "heads": "heads",
    "kvHeads": "kv_heads",
    "ffnHiddenSize": "ffn_hidden_size",
    "vocabSize": "vocab_size",
    "mlp": "mlp",
    "norm": "norm",
    "tiedEmbeddings": "tied_embeddings",
    "dropout": "dropout",
    "positionEmbedding": "position_embedding",
    "maxSequenceLength": "max_sequence_length",
    "extraParameters": "extra_parameters",
    "family": "family",  # LoRA module names and the trainer's config check (layout.json family)
    "qkvBias": "qkv_bias",  # optional addition to job-spec.md (Qwen2 / ChatGLM style Q/K/V biases)
}
_ARCH_BOOLS = {"tiedEmbeddings", "dropout", "qkvBias"}
_ARCH_STRINGS = {"mlp", "norm", "positionEmbedding", "family"}


_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def architecture_spec(arch: Architecture) -> dict[str, Any]:
    """The job spec's ``model.architecture`` block (camelCase) of an Architecture; read back by
    request_from_spec it gives the same Architecture."""
    fields = arch.to_dict()
    return {camel: fields[snake] for camel, snake in _ARCH_FIELDS.items()}


class SpecError(PlanInputError):
    """A spec value is invalid; the one-line message names the field and the value."""


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{path}: expected a mapping, got {value!r}")
    return cast(Mapping[str, Any], value)


def _int(section: Mapping[str, Any], key: str, path: str, *, minimum: int = 1) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{path}.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _bool(section: Mapping[str, Any], key: str, path: str) -> bool | None:
    value = section.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise SpecError(f"{path}.{key}: expected true or false, got {value!r}")


def _choice(section: Mapping[str, Any], key: str, path: str, choices: tuple[str, ...]) -> str | None:
    value = section.get(key)
    if value is None:
        return None
    if value not in choices:
        raise SpecError(f"{path}.{key}: expected one of {', '.join(choices)}, got {value!r}")
    return cast(str, value)


def spec_from_manifest(doc: Any) -> Mapping[str, Any]:
    """The `spec` of a ParallelTrainingJob manifest, checking apiVersion and kind."""
    if not isinstance(doc, Mapping):
        raise SpecError(f"manifest: expected a {KIND} mapping, got {type(doc).__name__}")
    if doc.get("kind") != KIND:
        raise SpecError(f"manifest kind: expected {KIND}, got {doc.get('kind')!r}")
    if doc.get("apiVersion") != API_VERSION:
        raise SpecError(f"manifest apiVersion: expected {API_VERSION}, got {doc.get('apiVersion')!r}")
    return _mapping(doc.get("spec"), "spec")


def model_from_spec(model: Mapping[str, Any]) -> ModelSpec:
    """spec.model: exactly one of preset, architecture, parameters."""
    given = [k for k in ("preset", "architecture", "parameters") if model.get(k) is not None]
    if len(given) != 1:
        raise SpecError(
            "spec.model: give exactly one of preset, architecture, parameters "
            f"(got {', '.join(given) or 'none'})"
        )
    if given[0] == "preset":
        name = model["preset"]
        if not isinstance(name, str):
            raise SpecError(f"spec.model.preset: expected a name, got {name!r}")
        try:
            return preset(name)
        except PlanInputError as exc:
            raise SpecError(f"spec.model.preset: {exc}") from None
    if given[0] == "parameters":
        try:
            count = parse_count(model["parameters"], "spec.model.parameters")
        except PlanInputError as exc:
            raise SpecError(str(exc)) from None
        return ModelSpec(name="custom", parameter_count=count)
    arch = _mapping(model["architecture"], "spec.model.architecture")
    kwargs: dict[str, Any] = {"family": "custom"}
    path = "spec.model.architecture"
    for key, value in arch.items():
        if key not in _ARCH_FIELDS:
            raise SpecError(f"{path}: unknown field {key!r}")
        if key in _ARCH_BOOLS:
            kwargs[_ARCH_FIELDS[key]] = _bool(arch, key, path)
        elif key in _ARCH_STRINGS:
            if not isinstance(value, str):
                raise SpecError(f"{path}.{key}: expected a string, got {value!r}")
            kwargs[_ARCH_FIELDS[key]] = value
        else:
            minimum = 0 if key in ("kvHeads", "ffnHiddenSize", "extraParameters") else 1
            kwargs[_ARCH_FIELDS[key]] = _int(arch, key, path, minimum=minimum)
    for required in ("layers", "hiddenSize", "heads", "vocabSize"):
        if arch.get(required) is None:
            raise SpecError(f"{path}.{required}: required")
    try:
        return ModelSpec(name="custom", architecture=Architecture(**kwargs))
    except PlanInputError as exc:
        raise SpecError(f"{path}: {exc}") from None


def _training(training: Mapping[str, Any]) -> tuple[TrainingSettings, dict[str, Any]]:
    path = "spec.training"
    kwargs: dict[str, Any] = {}
    method = _choice(training, "method", path, ("full", "lora", "qlora", "freeze", "inference"))
    if method:
        kwargs["method"] = method
    precision = _choice(training, "precision", path, ("bf16", "fp16", "bf16-pure", "fp32"))
    if precision:
        kwargs["precision"] = precision
    seq = _int(training, "sequenceLength", path)
    if seq is not None:
        kwargs["sequence_length"] = seq
    batch = _int(training, "globalBatchSize", path)
    if batch is not None:
        kwargs["global_batch_size"] = batch
    rank = _int(training, "loraRank", path)
    if rank is not None:
        kwargs["lora_rank"] = rank
    targets = training.get("loraTargets")
    if targets is not None:
        if not isinstance(targets, list) or not all(t in LORA_TARGETS for t in targets) or not targets:
            choices = ", ".join(LORA_TARGETS)
            raise SpecError(f"{path}.loraTargets: expected a list of {choices}, got {targets!r}")
        kwargs["lora_targets"] = tuple(targets)
    alpha = training.get("loraAlpha")
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= 4096:
            raise SpecError(f"{path}.loraAlpha: expected a number in (0, 4096], got {alpha!r}")
        kwargs["lora_alpha"] = float(alpha)
    dropout = training.get("loraDropout")
    if dropout is not None:
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
            raise SpecError(f"{path}.loraDropout: expected a number in [0, 1), got {dropout!r}")
        kwargs["lora_dropout"] = float(dropout)
    fraction = training.get("trainableFraction")
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise SpecError(f"{path}.trainableFraction: expected a number in (0, 1], got {fraction!r}")
        kwargs["trainable_fraction"] = float(fraction)
    lr = training.get("learningRate")
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr <= 1:
            raise SpecError(f"{path}.learningRate: expected a number in (0, 1], got {lr!r}")
        kwargs["learning_rate"] = float(lr)
    method_name = kwargs.get("method", "full")
    for field_name, methods in (
        ("loraRank", ("lora", "qlora")),
        ("loraTargets", ("lora", "qlora")),
        ("loraAlpha", ("lora", "qlora")),
        ("loraDropout", ("lora", "qlora")),
        ("trainableFraction", ("freeze",)),
    ):
        if training.get(field_name) is not None and method_name not in methods:
            # The same rule as the CRD's, so the CLI and the API server agree on what is valid.
            raise SpecError(
                f"{path}.{field_name}: applies to method {' / '.join(methods)} only, not {method_name}"
            )
    pins: dict[str, Any] = {}
    micro = _int(training, "microBatchSize", path, minimum=0)
    if micro:
        pins["micro_batch"] = micro
    ckpt = _choice(training, "activationCheckpointing", path, ("auto", "none", "selective", "full"))
    if ckpt and ckpt != "auto":
        pins["checkpointing"] = ckpt
    sp = _bool(training, "sequenceParallel", path)
    if sp is not None:
        pins["sequence_parallel"] = sp
    offload = _choice(training, "offload", path, ("auto", "none", "optimizer", "all"))
    if offload and offload != "auto":
        pins["offload"] = offload
    if method_name == "inference":
        if pins.get("checkpointing") not in (None, "none"):
            raise SpecError(
                f"{path}.activationCheckpointing: inference keeps no activations; use auto or none"
            )
        if pins.get("offload") == "optimizer":
            raise SpecError(f"{path}.offload: inference has no optimizer to offload")
    return TrainingSettings(**kwargs), pins


def _cluster(
    resources: Mapping[str, Any],
    nodes: int | None,
    gpus_per_node: int | None,
    gpu_spec: GpuSpec | None,
    node_memory_bytes: int | None,
) -> Cluster:
    path = "spec.resources"
    total = _int(resources, "gpus", path)
    spec_nodes = _int(resources, "nodes", path)
    spec_gpn = _int(resources, "gpusPerNode", path)
    # The CRD's bounds: pod names `<job>-node-<i>` keep at most 4 digits, and one node has at most
    # 64 devices of a kind.
    for key, value, limit in (
        ("gpus", total, 65536),
        ("nodes", spec_nodes, 10000),
        ("gpusPerNode", spec_gpn, 64),
    ):
        if value is not None and value > limit:
            raise SpecError(f"{path}.{key}: at most {limit}, got {value}")
    product = resources.get("gpuProduct")
    if product is not None and (
        not isinstance(product, str) or len(product) > 63 or not _LABEL_VALUE.match(product)
    ):
        raise SpecError(f"{path}.gpuProduct: expected a node label value (the GFD product), got {product!r}")
    if nodes is None and gpus_per_node is None:
        if (
            total is not None
            and spec_nodes is not None
            and spec_gpn is not None
            and total != spec_nodes * spec_gpn
        ):
            raise SpecError(f"{path}: gpus={total} is not nodes x gpusPerNode = {spec_nodes} x {spec_gpn}")
        if spec_nodes is not None and spec_gpn is not None:
            nodes, gpus_per_node = spec_nodes, spec_gpn
        elif total is not None:
            gpus_per_node = spec_gpn or (total if total <= DEFAULT_GPUS_PER_NODE else DEFAULT_GPUS_PER_NODE)
            if total % gpus_per_node:
                raise SpecError(
                    f"{path}.gpus: {total} GPUs do not fill nodes of {gpus_per_node} (give nodes)"
                )
            nodes = total // gpus_per_node
        elif spec_nodes is not None or spec_gpn is not None:
            raise SpecError(f"{path}: give gpus, or both nodes and gpusPerNode")
        else:
            raise SpecError(f"{path}: the number of GPUs is required (gpus, or nodes and gpusPerNode)")
    elif nodes is None or gpus_per_node is None:
        raise SpecError("override: give both nodes and gpus_per_node")
    if gpu_spec is None:
        product = resources.get("gpuProduct")
        if product is not None and not isinstance(product, str):
            raise SpecError(f"{path}.gpuProduct: expected a GFD product label, got {product!r}")
        memory = None
        if resources.get("gpuMemory") is not None:
            try:
                memory = parse_size(resources["gpuMemory"], f"{path}.gpuMemory")
            except PlanInputError as exc:
                raise SpecError(str(exc)) from None
        try:
            gpu_spec = gpu(product, memory)
        except PlanInputError as exc:
            raise SpecError(f"{path}: {exc}") from None
    if node_memory_bytes is None and resources.get("nodeMemory") is not None:
        try:
            node_memory_bytes = parse_size(resources["nodeMemory"], f"{path}.nodeMemory")
        except PlanInputError as exc:
            raise SpecError(str(exc)) from None
    return Cluster(nodes, gpus_per_node, gpu_spec, node_memory_bytes)


def pins_from_status_layout(layout: Mapping[str, Any]) -> Pins:
    """Pins that reproduce an earlier plan from its `status.layout` (CRD names, as written by
    shardwise.resources.layout_file.status_layout); nodes / gpusPerNode go to the cluster."""
    path = "status.layout"
    zero = _int(layout, "zeroStage", path, minimum=0)
    try:
        return Pins(
            tp=_int(layout, "tensor", path),
            pp=_int(layout, "pipeline", path),
            zero_stage=zero,
            micro_batch=_int(layout, "microBatchSize", path),
            checkpointing=cast(
                Any, _choice(layout, "activationCheckpointing", path, ("none", "selective", "full"))
            ),
            sequence_parallel=_bool(layout, "sequenceParallel", path),
            offload=cast(Any, _choice(layout, "offload", path, ("none", "optimizer", "all"))),
            expert=_int(layout, "expert", path),
        )
    except SpecError:
        raise
    except PlanInputError as exc:
        raise SpecError(f"{path}: {exc}") from None


def request_from_spec(
    spec: Mapping[str, Any],
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    gpu: GpuSpec | None = None,
    node_memory_bytes: int | None = None,
    settings: PlannerSettings | None = None,
    model: ModelSpec | None = None,
) -> PlanRequest:
    """Build the planner request of a ParallelTrainingJob spec.

    The operator passes the cluster inventory (nodes, gpus_per_node, gpu, node memory) as
    overrides; the CLI passes its flags the same way. SpecError names the first bad value.
    """
    if not isinstance(spec, Mapping):
        raise SpecError(f"spec: expected a mapping, got {type(spec).__name__}")
    if model is None:
        model = model_from_spec(_mapping(spec.get("model"), "spec.model"))
    training, pin_kwargs = _training(_mapping(spec.get("training"), "spec.training"))
    try:
        storage = storage_from_spec(spec)
    except PlanInputError as exc:
        raise SpecError(str(exc)) from None
    if storage.model is not None:
        # A model directory means pretrained weights, whatever the method (the capability row).
        training = dataclasses.replace(training, pretrained=True)
    arch = model.architecture
    explicit = isinstance(spec.get("model"), Mapping) and spec["model"].get("architecture") is not None
    if (
        explicit
        and arch is not None
        and arch.position_embedding == "learned"
        and training.sequence_length > arch.max_sequence_length
    ):
        # The CRD's rule for an explicit architecture (a preset's table is the planner's to judge).
        raise SpecError(
            f"spec.training.sequenceLength: {training.sequence_length} exceeds the learned position"
            f" table of {arch.max_sequence_length} (spec.model.architecture.maxSequenceLength)"
        )
    parallelism = _mapping(spec.get("parallelism"), "spec.parallelism")
    path = "spec.parallelism"
    tensor = _int(parallelism, "tensor", path)
    pipeline = _int(parallelism, "pipeline", path)
    zero = _int(parallelism, "zeroStage", path, minimum=0)
    if zero is not None and zero > 3:
        raise SpecError(f"{path}.zeroStage: expected 0, 1, 2 or 3, got {zero}")
    try:
        expert = _int(parallelism, "expert", path)
        pins = Pins(tp=tensor, pp=pipeline, zero_stage=zero, expert=expert, **pin_kwargs)
        cluster = _cluster(
            _mapping(spec.get("resources"), "spec.resources"), nodes, gpus_per_node, gpu, node_memory_bytes
        )
    except SpecError:
        raise
    except PlanInputError as exc:
        raise SpecError(str(exc)) from None
    return PlanRequest(
        model=model, cluster=cluster, training=training, pins=pins, settings=settings or PlannerSettings()
    )
