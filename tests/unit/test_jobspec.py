"""ParallelTrainingJob spec -> PlanRequest (shardwise.jobspec), including every bad value."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from shardwise.jobspec import SpecError, pins_from_status_layout, request_from_spec, spec_from_manifest
from shardwise.planner import gpu, plan
from shardwise.resources.deepspeed_config import deepspeed_config_for
from shardwise.resources.layout_file import status_layout


def _spec(**sections: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"preset": "llama-2-7b"},
        "training": {"method": "full", "precision": "bf16", "sequenceLength": 4096, "globalBatchSize": 64},
        "resources": {"nodes": 2, "gpusPerNode": 8, "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
    }
    for key, value in sections.items():
        spec[key] = value
    return spec


def test_full_spec_maps_every_field() -> None:
    spec = _spec(
        training={
            "method": "lora", "precision": "fp16", "sequenceLength": 8192, "globalBatchSize": 32,
            "microBatchSize": 2, "activationCheckpointing": "selective", "sequenceParallel": True,
            "offload": "optimizer", "loraRank": 8, "loraTargets": ["q", "v"],
        },
        parallelism={"tensor": 2, "pipeline": 1, "zeroStage": 2},
        resources={"gpus": 16, "nodes": 2, "gpusPerNode": 8, "gpuProduct": "NVIDIA-A100-SXM4-80GB",
                   "gpuMemory": "40GiB", "nodeMemory": "1TiB"},
    )  # fmt: skip
    r = request_from_spec(spec)
    assert (r.training.method, r.training.precision, r.sequence_length, r.global_batch_size) == (
        "lora", "fp16", 8192, 32,
    )  # fmt: skip
    assert (r.training.lora_rank, r.training.lora_targets) == (8, ("q", "v"))
    p = r.pins
    assert (p.tp, p.pp, p.zero_stage, p.micro_batch, p.checkpointing, p.sequence_parallel, p.offload) == (
        2, 1, 2, 2, "selective", True, "optimizer",
    )  # fmt: skip
    c = r.cluster
    assert (c.nodes, c.gpus_per_node, c.gpu.name, c.gpu.memory_bytes, c.node_memory_bytes) == (
        2, 8, "A100-80GB", 40 * 2**30, 2**40,
    )  # fmt: skip


def test_auto_values_leave_knobs_unpinned() -> None:
    spec = _spec(training={"activationCheckpointing": "auto", "offload": "auto", "microBatchSize": 0})
    pins = request_from_spec(spec).pins
    assert (pins.checkpointing, pins.offload, pins.micro_batch, pins.sequence_parallel) == (
        None,
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("resources", "shape"),
    [
        ({"gpus": 8}, (1, 8)),
        ({"gpus": 4}, (1, 4)),
        ({"gpus": 64}, (8, 8)),
        ({"nodes": 3, "gpusPerNode": 2}, (3, 2)),
    ],
)
def test_gpu_counts(resources: dict[str, Any], shape: tuple[int, int]) -> None:
    r = request_from_spec(_spec(resources={**resources, "gpuMemory": "24GiB"}))
    assert (r.cluster.nodes, r.cluster.gpus_per_node) == shape


def test_operator_overrides_the_cluster_from_its_inventory() -> None:
    r = request_from_spec(_spec(), nodes=4, gpus_per_node=4, gpu=gpu("NVIDIA-L40S"), node_memory_bytes=2**38)
    assert (r.cluster.nodes, r.cluster.gpus_per_node, r.cluster.gpu.name, r.cluster.node_memory_bytes) == (
        4, 4, "L40S", 2**38,
    )  # fmt: skip


def test_architecture_and_parameters_models() -> None:
    arch = {"layers": 4, "hiddenSize": 64, "heads": 4, "vocabSize": 256, "mlp": "gelu", "norm": "layernorm"}
    r = request_from_spec(_spec(model={"architecture": arch}))
    assert r.model.architecture is not None and r.model.architecture.ffn_hidden_size == 256
    r = request_from_spec(_spec(model={"parameters": "7e9"}))
    assert r.model.architecture is None and r.model.parameters == 7_000_000_000


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_spec(model={"preset": "llama-9"}), "unknown model preset 'llama-9'"),
        (_spec(model={}), "exactly one of preset, architecture, parameters"),
        (_spec(model={"preset": "llama-2-7b", "parameters": 7}), "exactly one of"),
        (_spec(model={"parameters": "-7e9"}), "spec.model.parameters"),
        (_spec(model={"architecture": {"layers": 2, "hiddenSize": 64, "heads": 4}}), "vocabSize: required"),
        (
            _spec(model={"architecture": {"layers": 2, "hiddenSize": 64, "heads": 5, "vocabSize": 8}}),
            "heads=5",
        ),
        (
            _spec(
                model={"architecture": {"layers": 2, "hiddenSize": 64, "heads": 4, "vocabSize": 8, "x": 1}}
            ),
            "'x'",
        ),
        (_spec(training={"method": "sft"}), "spec.training.method"),
        (_spec(training={"sequenceLength": -4}), "spec.training.sequenceLength"),
        (_spec(training={"globalBatchSize": 0}), "spec.training.globalBatchSize"),
        (_spec(training={"loraTargets": ["q", "qq"]}), "spec.training.loraTargets"),
        (_spec(training={"trainableFraction": 2}), "spec.training.trainableFraction"),
        (_spec(parallelism={"tensor": 0}), "spec.parallelism.tensor"),
        (_spec(parallelism={"zeroStage": 4}), "spec.parallelism.zeroStage"),
        (_spec(resources={"gpus": 12, "gpuMemory": "24GiB"}), "12 GPUs do not fill nodes of 8"),
        (_spec(resources={"gpus": 8, "nodes": 2, "gpusPerNode": 8}), "gpus=8 is not nodes x gpusPerNode"),
        (_spec(resources={"gpus": 8, "gpuMemory": "lots"}), "spec.resources.gpuMemory"),
        (_spec(resources={"gpus": 8, "gpuMemory": "-1GiB"}), "must be positive"),
        (_spec(resources={"gpus": 8}), "no GPU given"),
        (_spec(resources={"gpus": 8, "gpuProduct": "NVIDIA-Z9"}), "unknown GPU 'NVIDIA-Z9'"),
        (_spec(resources={"gpuMemory": "24GiB"}), "the number of GPUs is required"),
        (_spec(training="full"), "spec.training: expected a mapping"),
    ],
)
def test_bad_values_raise_spec_error_naming_them(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("(", r"\(")) as info:
        request_from_spec(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "expected a ParallelTrainingJob mapping"),
        ({"kind": "Job", "apiVersion": "batch/v1"}, "kind"),
        ({"kind": "ParallelTrainingJob", "apiVersion": "shardwise.dev/v2"}, "apiVersion"),
    ],
)
def test_manifest_checks(doc: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec_from_manifest(doc)


@pytest.mark.parametrize("preset_name", ["llama-2-70b", "chatglm3-6b", "gpt-7.5b"])
def test_status_layout_pins_reproduce_the_plan(preset_name: str) -> None:
    spec = _spec(model={"preset": preset_name})
    request = request_from_spec(spec)
    first = plan(request)
    assert first.choice is not None
    status = status_layout(first.choice)
    assert status["gpus"] == status["tensor"] * status["pipeline"] * status["data"]
    again = plan(dataclasses.replace(request, pins=pins_from_status_layout(status)))
    assert again.choice is not None and again.layouts_considered == 1
    assert again.choice.layout == first.choice.layout


def test_status_layout_with_bad_values() -> None:
    with pytest.raises(SpecError, match=r"status\.layout\.offload"):
        pins_from_status_layout({"tensor": 1, "offload": "disk"})


def test_learning_rate_reaches_the_deepspeed_config() -> None:
    request = request_from_spec(_spec(training={"learningRate": 0.003}))
    assert request.training.learning_rate == 0.003
    result = plan(request)
    assert result.choice is not None
    assert deepspeed_config_for(request, result.choice.layout)["optimizer"]["params"]["lr"] == 0.003
    default = request_from_spec(_spec())
    assert default.training.learning_rate == 1e-5


@pytest.mark.parametrize("bad", [0, -1e-3, 2, "fast", True])
def test_bad_learning_rate_is_named(bad: Any) -> None:
    with pytest.raises(SpecError, match="learningRate"):
        request_from_spec(_spec(training={"learningRate": bad}))


def test_a_pinned_pipeline_with_unpinned_tensor_plans_without_dividing_by_zero() -> None:
    spec = _spec(parallelism={"pipeline": 2}, resources={"gpus": 2, "gpuProduct": "NVIDIA-A100-SXM4-80GB"})
    result = plan(request_from_spec(spec))
    assert result.choice is not None
    assert (result.choice.layout.tp, result.choice.layout.pp) == (1, 2)


@pytest.mark.parametrize(
    ("training", "fragment"),
    [
        ({"method": "full", "loraRank": 8}, "loraRank"),
        ({"method": "full", "loraTargets": ["q"]}, "loraTargets"),
        ({"method": "lora", "trainableFraction": 0.5}, "trainableFraction"),
        ({"method": "inference", "activationCheckpointing": "full"}, "activationCheckpointing"),
        ({"method": "inference", "offload": "optimizer"}, "offload"),
    ],
)
def test_method_specific_fields_follow_the_crd_rules(training: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        request_from_spec(_spec(training=training))


def test_a_null_required_architecture_field_is_named() -> None:
    with pytest.raises(SpecError, match="hiddenSize"):
        request_from_spec(
            _spec(model={"architecture": {"layers": 2, "hiddenSize": None, "heads": 2, "vocabSize": 100}})
        )


_TEMPLATE_WITH_VOLUME = {
    "spec": {"containers": [{"name": "trainer", "image": "t"}], "volumes": [{"name": "m"}]}
}


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"model": {"preset": "llama-2-7b", "path": "models/llama"}},
            "spec.model.path must be an absolute path",
        ),
        ({"model": {"preset": "llama-2-7b", "path": "/a/../b"}}, "without .. segments"),
        ({"model": {"preset": "llama-2-7b", "volume": {"claimName": "m"}}}, "spec.model.volume needs"),
        ({"model": {"preset": "llama-2-7b", "path": "/m", "volume": {}}}, "exactly one of claimName or name"),
        (
            {"model": {"preset": "llama-2-7b", "path": "/m", "volume": {"claimName": "a", "name": "m"}}},
            "exactly one of claimName or name",
        ),
        (
            {"model": {"preset": "llama-2-7b", "path": "/m", "volume": {"name": "x"}}},
            "spec.model.volume.name x",
        ),
        ({"data": {"path": "/d", "format": "csv"}}, "spec.data.format: expected one of auto"),
        ({"data": {"path": "/d", "packing": "squash"}}, "spec.data.packing"),
        ({"data": {"format": "messages"}}, "spec.data.path: required"),
        ({"data": {"path": "/d", "validation": {}}}, "exactly one of path or fraction"),
        (
            {"data": {"path": "/d", "validation": {"path": "/v", "fraction": 0.1}}},
            "exactly one of path or fraction",
        ),
        ({"data": {"path": "/d", "validation": {"fraction": 1}}}, "0 < fraction < 1"),
        ({"data": {"path": "/d", "validation": {"fraction": 0}}}, "0 < fraction < 1"),
        ({"data": {"path": "/d", "evalEvery": 5}}, "evalEvery needs spec.data.validation"),
        ({"data": {"path": "/d", "validation": {"fraction": 0.1}, "evalEvery": 0}}, "spec.data.evalEvery"),
        (
            {"data": {"path": "/d", "volume": {"claimName": "c", "subPath": "/abs"}}},
            "subPath must be a relative",
        ),
        (
            {"output": {"path": "/o", "volume": {"claimName": "c", "readOnly": True}}},
            "readOnly must be false",
        ),
        ({"output": {"volume": {"claimName": "c"}}}, "spec.output.path: required"),
        ({"checkpoint": {"path": "/c", "keep": 0}}, "spec.checkpoint.keep"),
        ({"checkpoint": {"path": "/c", "everySteps": 0}}, "spec.checkpoint.everySteps"),
        ({"checkpoint": {"path": "/c", "everyMinutes": 0}}, "spec.checkpoint.everyMinutes"),
    ],
)
def test_bad_model_data_output_checkpoint_fields(sections: dict[str, Any], message: str) -> None:
    spec = _spec(template=_TEMPLATE_WITH_VOLUME, **sections)
    with pytest.raises(SpecError, match=re.escape(message)):
        request_from_spec(spec)


def test_a_model_path_makes_the_job_pretrained() -> None:
    assert not request_from_spec(_spec()).training.pretrained
    spec = _spec(
        model={"preset": "llama-2-7b", "path": "/llama", "volume": {"name": "m"}},
        template=_TEMPLATE_WITH_VOLUME,
        data={
            "path": "/d.jsonl",
            "volume": {"claimName": "c"},
            "validation": {"fraction": 0.05},
            "evalEvery": 10,
        },
        output={"path": "/o", "volume": {"claimName": "c"}},
        checkpoint={"path": "/c", "everySteps": 100, "everyMinutes": 30, "keep": 1},
    )
    assert request_from_spec(spec).training.pretrained
