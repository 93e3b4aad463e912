"""DeepSpeed config and layout.json builders (shardwise.resources), held against deepspeed's parser."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shardwise.planner import Cluster, Layout, PlanRequest, TrainingSettings, gpu, plan, preset
from shardwise.resources.deepspeed_config import deepspeed_config
from shardwise.resources.layout_file import layout_document, layout_document_for

LAYOUTS = [
    Layout(1, 1, 1, 0, 1, 8, "none", False, "none", 1, 1),
    Layout(2, 1, 1, 1, 2, 4, "selective", True, "optimizer", 1, 2),
    Layout(1, 1, 1, 2, 1, 2, "full", False, "optimizer", 1, 1),
    Layout(1, 2, 1, 1, 1, 4, "none", False, "none", 1, 2),
    Layout(1, 1, 1, 3, 4, 1, "full", False, "all", 1, 1),
]
PRECISIONS = ["bf16", "fp16", "bf16-pure", "fp32"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_deepspeed_config_fields(layout: Layout, precision: str) -> None:
    cfg = deepspeed_config(layout, precision)
    assert cfg["train_batch_size"] == layout.micro_batch * layout.grad_accum * layout.dp
    assert cfg["train_micro_batch_size_per_gpu"] == layout.micro_batch
    assert cfg["gradient_accumulation_steps"] == layout.grad_accum
    zero = cfg["zero_optimization"]
    assert zero["stage"] == layout.zero_stage
    assert ("offload_optimizer" in zero) == (layout.offload != "none")
    assert ("offload_param" in zero) == (layout.offload == "all")
    if layout.offload != "none":
        assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert cfg["optimizer"]["type"] == "AdamW"
    assert ("activation_checkpointing" in cfg) == (layout.checkpointing != "none")
    assert ("bf16" in cfg) == (precision == "bf16" or (precision == "bf16-pure" and layout.zero_stage >= 1))
    assert ("fp16" in cfg) == (precision == "fp16")
    json.dumps(cfg)  # serialisable as ds_config.json


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_deepspeed_accepts_the_config(layout: Layout, precision: str) -> None:
    config_module: Any = pytest.importorskip("deepspeed.runtime.config")
    parsed = config_module.DeepSpeedConfig(deepspeed_config(layout, precision))
    assert parsed.train_batch_size == layout.micro_batch * layout.grad_accum * layout.dp
    assert parsed.zero_optimization_stage == layout.zero_stage


def test_layout_document_follows_the_contract() -> None:
    request = PlanRequest(
        model=preset("llama-2-70b"),
        cluster=Cluster(2, 8, gpu("H100")),
        training=TrainingSettings(sequence_length=4096, global_batch_size=64),
    )
    result = plan(request)
    doc = layout_document_for(result)
    assert set(doc) == {"version", "model", "training", "layout", "ranks", "predicted", "deepspeed"}
    assert doc["version"] == 1
    assert set(doc["model"]) == {"name", "parameters", "architecture"}
    assert set(doc["model"]["architecture"]) == {
        "family", "layers", "hidden_size", "heads", "kv_heads", "ffn_hidden_size", "vocab_size", "mlp",
        "norm", "tied_embeddings", "dropout", "position_embedding", "max_sequence_length", "qkv_bias",
        "extra_parameters",
    }  # fmt: skip
    assert set(doc["training"]) == {
        "method", "precision", "sequence_length", "global_batch_size", "lora_rank", "lora_targets",
        "lora_alpha", "lora_dropout", "trainable_fraction", "first_trainable_layer", "model_source",
        "optimizer",
    }  # fmt: skip
    assert set(doc["layout"]) == {
        "tp", "pp", "dp", "zero_stage", "micro_batch", "grad_accum", "checkpointing", "sequence_parallel",
        "offload", "nodes", "gpus_per_node", "ep",
    }  # fmt: skip
    lay = doc["layout"]
    assert lay["micro_batch"] * lay["grad_accum"] * lay["dp"] == doc["training"]["global_batch_size"]
    assert doc["ranks"]["order"] == ["pp", "dp", "tp"]
    stages = doc["ranks"]["stage_layers"]
    assert len(stages) == lay["pp"] and stages[0][0] == 0 and stages[-1][1] == 80
    predicted = doc["predicted"]
    assert set(predicted) == {
        "gpu_memory_bytes", "per_stage", "cpu_memory_per_node", "step_time_seconds", "gpu", "gpu_peak_flops",
        "model_flops_per_step", "mfu",
    }  # fmt: skip
    for i, stage in enumerate(predicted["per_stage"]):
        assert stage["stage"] == i
        assert stage["total"] == sum(
            stage[k] for k in ("parameters", "gradients", "optimizer_states", "activations", "overhead")
        )
        assert (
            stage["model_state_bytes"] == stage["parameters"] + stage["gradients"] + stage["optimizer_states"]
        )
    assert doc["deepspeed"]["train_batch_size"] == doc["training"]["global_batch_size"]


def test_layout_document_of_an_infeasible_plan_is_refused() -> None:
    request = PlanRequest(
        model=preset("llama-2-70b"), cluster=Cluster(1, 1, gpu("RTX-4090"), node_memory_bytes=64 * 2**30)
    )
    with pytest.raises(ValueError, match="infeasible"):
        layout_document_for(plan(request))


def test_lora_layout_document_carries_rank_and_targets() -> None:
    request = PlanRequest(
        model=preset("llama-2-7b"),
        cluster=Cluster(1, 1, gpu("RTX-4090")),
        training=TrainingSettings(method="lora", lora_rank=8, lora_targets=("q", "v"), sequence_length=1024),
    )
    result = plan(request)
    assert result.choice is not None
    doc = layout_document(request, result.choice)
    assert (doc["training"]["lora_rank"], doc["training"]["lora_targets"]) == (8, ["q", "v"])
