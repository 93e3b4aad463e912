"""Adapts the operator's DeepSpeed config to the layout and to the device this rank runs on.

Pure (no torch import): ``adapt(config, layout, on_cpu=...)`` returns the config DeepSpeed gets
plus the list of changes made, each with its reason, which the trainer logs. The operator builds
``ds_config.json`` for GPUs; on a CPU-only machine (tests, demo, ``DS_ACCELERATOR=cpu``) a few
keys cannot work as written:

* ``fp16`` on CPU: the CPU accelerator has no fp16 loss-scaled path worth running; fp16 is
  replaced by bf16 (same memory per value, so the plan's byte counts still hold).
* ``zero_optimization.offload_optimizer`` / ``offload_param`` run as planned, on CPU too, with
  ``pin_memory`` off on CPU (there is no device to pin host buffers for).

Without offload, ``optimizer`` Adam / AdamW gets ``torch_adam: true`` unless the config sets it
explicitly: DeepSpeed would otherwise pick ``FusedAdam``, an op JIT-compiled on first use, which
needs nvcc (absent from the PyTorch *runtime* base image) or, on the CPU accelerator, a build of
its own. ``torch.optim.AdamW`` keeps the same states (two fp32 moments per parameter). With
offload the optimizer is DeepSpeed's ``DeepSpeedCPUAdam`` (built with g++, present in the image;
``hack/setup`` builds it once into the torch extensions cache).

For the built-in model ``tensor_parallel`` (DeepSpeed AutoTP) is removed: the trainer builds its
layers already sharded over its own TP group. For a Hugging Face model it is set to
``{"autotp_size": tp}`` when tp > 1 (AutoTP shards the loaded model, see hf_tp.py) and removed
otherwise. The batch keys are made to agree with the layout
(``train_batch_size`` = ``micro_batch * grad_accum * dp``), the ZeRO stage is the layout's, and
the precision section matches ``training.precision`` (``fp32`` disables ``bf16`` and ``fp16``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from shardwise_trainer.contract import Layout

#: Used when the operator's config carries no ``optimizer`` section.
DEFAULT_OPTIMIZER: dict[str, Any] = {
    "type": "AdamW",
    "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0},
}


@dataclass
class Adapted:
    """The config handed to ``deepspeed.initialize`` and the changes made to get it."""

    config: dict[str, Any]
    changes: list[str] = field(default_factory=list)


def adapt(
    config: dict[str, Any], layout: Layout, *, on_cpu: bool, lr: float | None = None, autotp: bool = False
) -> Adapted:
    """Return a copy of ``config`` consistent with ``layout`` and runnable on this device
    (``lr``: the ``--lr`` override of the optimizer's learning rate; ``autotp``: a Hugging Face
    model, which DeepSpeed AutoTP shards when ``layout.tp > 1``)."""
    cfg = copy.deepcopy(config)
    out = Adapted(cfg)

    def setk(key: str, value: Any, why: str) -> None:
        if cfg.get(key) != value:
            if key in cfg:
                out.changes.append(f"{key}: {cfg[key]!r} -> {value!r} ({why})")
            cfg[key] = value

    setk("train_micro_batch_size_per_gpu", layout.micro_batch, "layout.micro_batch")
    setk("gradient_accumulation_steps", layout.grad_accum, "layout.grad_accum")
    setk("train_batch_size", layout.micro_batch * layout.grad_accum * layout.dp, "micro*accum*dp")
    cfg["steps_per_print"] = 10**9  # the trainer prints its own per-step lines
    if layout.sp > 1:
        setk("sequence_parallel_size", layout.sp, "layout sp")
    elif "sequence_parallel_size" in cfg:
        out.changes.append(f"sequence_parallel_size {cfg['sequence_parallel_size']!r} removed (layout sp=1)")
        del cfg["sequence_parallel_size"]
    if autotp:  # a pretrained model: DeepSpeed AutoTP shards it over the layout's TP degree
        tensor = {"autotp_size": layout.tp} if layout.tp > 1 else None
        if cfg.get("tensor_parallel") != tensor:
            out.changes.append(f"tensor_parallel: {cfg.get('tensor_parallel')!r} -> {tensor!r} (layout tp)")
        cfg.pop("tensor_parallel", None)
        if tensor is not None:
            cfg["tensor_parallel"] = tensor
    elif "tensor_parallel" in cfg:
        out.changes.append(
            f"tensor_parallel {cfg['tensor_parallel']!r} removed (the trainer shards the model itself, "
            "Megatron-style, over its TP group; DeepSpeed AutoTP would shard it again)"
        )
        del cfg["tensor_parallel"]
    cfg.setdefault("wall_clock_breakdown", False)

    zero = dict(cfg.get("zero_optimization") or {})
    if zero.get("stage", layout.zero_stage) != layout.zero_stage:
        out.changes.append(f"zero_optimization.stage: {zero.get('stage')} -> {layout.zero_stage} (layout)")
    zero["stage"] = layout.zero_stage
    # Offload runs as planned, on CPU too: DeepSpeed steps the offloaded optimizer with its
    # DeepSpeedCPUAdam op (built once with g++, cached in the torch extensions directory).
    offloading = "offload_optimizer" in zero or "offload_param" in zero
    if on_cpu:
        for key in ("offload_optimizer", "offload_param"):
            if key in zero and zero[key].get("pin_memory"):
                zero[key] = {**zero[key], "pin_memory": False}
                out.changes.append(f"zero_optimization.{key}.pin_memory -> false (CPU: nothing to pin for)")
    if layout.sp > 1 and layout.zero_stage == 3 and zero.get("reduce_scatter", True) is not True:
        # sequence_parallel.py scales the gradients for ZeRO-3's reduce-scatter path: keep every
        # bucket on it (the all-reduce path divides differently).
        out.changes.append("zero_optimization.reduce_scatter -> true (sequence parallelism under ZeRO-3)")
        zero["reduce_scatter"] = True
    if layout.zero_stage == 3:
        # The output (outputs.py) gathers the 16-bit weights from the partitions.
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    cfg["zero_optimization"] = zero

    precision = layout.precision
    if on_cpu and precision == "fp16":
        out.changes.append("fp16 -> bf16 (CPU: no fp16 loss-scaled path; same bytes per value)")
        precision = "bf16"
    if precision != "fp16":
        cfg.pop("fp16", None)
    if precision == "fp32":
        if cfg.pop("bf16", None) is not None:
            out.changes.append("bf16 removed (training.precision is fp32)")
    elif precision in ("bf16", "bf16-pure"):
        bf16 = dict(cfg.get("bf16") or {})
        bf16["enabled"] = True
        cfg["bf16"] = bf16
    else:  # fp16 on GPU
        cfg.pop("bf16", None)
        fp16 = dict(cfg.get("fp16") or {})
        fp16["enabled"] = True
        cfg["fp16"] = fp16

    opt = copy.deepcopy(cfg.get("optimizer") or DEFAULT_OPTIMIZER)
    if str(opt.get("type", "")).lower() in ("adam", "adamw"):
        params = dict(opt.get("params") or {})
        if offloading:
            if params.pop("torch_adam", None):  # torch's AdamW would step the offloaded states
                out.changes.append("optimizer.params.torch_adam removed (offload steps DeepSpeedCPUAdam)")
        elif "torch_adam" not in params:
            out.changes.append("optimizer.params.torch_adam = true (FusedAdam is a JIT-built op)")
            params["torch_adam"] = True
        opt["params"] = params
    if lr is not None:
        params = dict(opt.get("params") or {})
        out.changes.append(f"optimizer.params.lr: {params.get('lr')!r} -> {lr!r} (--lr)")
        params["lr"] = lr
        opt["params"] = params
    cfg["optimizer"] = opt
    return out
