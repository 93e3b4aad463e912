"""Which model the run trains, built for the layout: the built-in decoder or a pretrained one.

* pretrained (``--hf-model``): loaded by ``pretrained.load_model`` (partitioned under ZeRO-3,
  4-bit for QLoRA), then ``methods.apply_method`` marks what trains;
* built-in, ``pp > 1``: a DeepSpeed ``PipelineModule`` holding this stage's layers;
* built-in otherwise: ``SequentialLM``, constructed inside ``deepspeed.zero.Init`` under ZeRO-3
  so each rank materialises only its partition, as the pretrained path does.

``load_peak_bytes`` is how much the process's peak memory grew while the model was built: under
ZeRO-3 it falls as DP grows (the benchmark ``benchmarks/zero3_load.py`` prints the table).
"""

# ruff: noqa: PLC0415 - torch / deepspeed load lazily (train.py imports this after them)
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardwise_trainer import methods, pretrained
from shardwise_trainer.contract import Layout


@dataclass
class BuiltModel:
    """The module DeepSpeed wraps, the Hugging Face model inside it (None for the built-in one),
    the model-parallel unit DeepSpeed gets, and what was counted while building."""

    model: Any
    hf_model: Any
    mpu: Any
    parameters: int
    trainable_parameters: int
    weights_4bit: int
    load_peak_bytes: int


def _memory_now() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _peak_since(baseline: int) -> int:
    from shardwise_trainer.stats import CpuDevice, device_for

    dev = device_for(0)
    return max(0, dev.peak_bytes() - (baseline if isinstance(dev, CpuDevice) else 0))


def build_model(
    layout: Layout,
    topo: Any,
    ds_config: dict[str, Any],
    *,
    seed: int,
    hf_model_dir: str | None,
    hf_config: Any,
    trust_remote_code: bool,
) -> BuiltModel:
    """Build (or load) the model of ``layout`` on this rank."""
    import deepspeed
    import torch

    from shardwise_trainer.model import SequentialLM, TPContext, count_parameters, pipeline_module
    from shardwise_trainer.topology import Mpu

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    baseline = _memory_now()
    arch = layout.architecture
    hf_model = None
    mpu: Any = Mpu(topo)
    if hf_model_dir:  # pp == 1; tp > 1 is DeepSpeed AutoTP (capabilities.TABLE, hf_tp.py)
        low_precision = layout.precision != "fp32"
        shard = None
        if layout.sp > 1:  # DeepSpeed's own SP groups (consecutive ranks, as Topology's)
            from shardwise_trainer import sequence_parallel

            mpu = sequence_parallel.register(
                hf_model_dir,
                sp=layout.sp,
                micro_batch=layout.micro_batch,
                sequence_length=layout.sequence_length,
            )
            shard = sequence_parallel.shard_of(mpu, zero_stage=layout.zero_stage)
        hf_model = pretrained.load_model(
            hf_model_dir,
            hf_config,
            ds_config=ds_config,
            zero_stage=layout.zero_stage,
            quantize_4bit=layout.method == "qlora",
            compute_dtype=torch.bfloat16 if low_precision else torch.float32,
            trust_remote_code=trust_remote_code,
            attn_implementation=None if shard is None else sequence_parallel.CORE_ATTENTION,
        )
        hf_model = methods.apply_method(
            hf_model,
            layout,
            pretrained.model_family(hf_config),
            checkpointing=layout.checkpointing != "none",
        )
        model = pretrained.wrap_for_training(hf_model, shard)
        parameters = pretrained.count_parameters(model)
        # With AutoTP the trainer's Mpu still goes to deepspeed.initialize: its config reads the DP
        # size (train_batch_size = micro * accum * dp) from it; the engine then builds its own TP
        # groups over consecutive ranks, the same order as Topology.
    else:
        tp_ctx = TPContext(size=topo.tp, rank=topo.tp_rank, group=topo.tp_group if topo.tp > 1 else None)
        if layout.pp > 1:
            from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

            ds_topo = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
            model = pipeline_module(
                arch,
                tp_ctx,
                seed=seed,
                checkpointing=layout.checkpointing,
                stage_layers=layout.stage_layers,
                topology=ds_topo,
            )
            mpu = None
        elif layout.zero_stage == 3:  # built partitioned: no rank ever holds the whole model
            with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=mpu):
                model = SequentialLM(arch, tp_ctx, seed, layout.checkpointing)
        else:
            model = SequentialLM(arch, tp_ctx, seed, layout.checkpointing)
        parameters = count_parameters(arch) + arch.extra_parameters
    return BuiltModel(
        model=model,
        hf_model=hf_model,
        mpu=mpu,
        parameters=parameters,
        trainable_parameters=methods.trainable_parameters(model),
        weights_4bit=sum(1 for p in model.parameters() if getattr(p, "quant_state", None) is not None),
        load_peak_bytes=_peak_since(baseline),
    )
