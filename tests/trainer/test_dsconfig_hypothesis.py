"""Planner layouts across DP / TP / PP / ZeRO / offload / precision, parsed by DeepSpeed's own config
classes with the real DP world size (a single-process gloo group plus an mpu reporting the degrees)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import deepspeed.comm as ds_dist
import deepspeed.comm.comm as ds_comm
import pytest
import torch.distributed as torch_dist
from deepspeed.runtime.config import DeepSpeedConfig
from hypothesis import HealthCheck, assume, event, given, reject, settings
from hypothesis import strategies as st

from shardwise.planner import Cluster, Pins, PlanInputError, PlanRequest, TrainingSettings, gpu, plan, preset
from shardwise.resources.layout_file import layout_document
from shardwise_trainer import contract, dsconfig

MODELS = ["gpt-1.7b", "llama-2-7b", "llama-2-13b", "gpt-18.4b", "llama-2-70b"]
GPU_TYPES = ["H100", "A100-40GB", "RTX-4090"]


@dataclass(frozen=True)
class Mpu:
    """The mpu interface DeepSpeed queries (Megatron's names): the layout's degrees."""

    tp: int
    pp: int
    dp: int

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_rank(self) -> int:
        return 0


@pytest.fixture(scope="module", autouse=True)
def gloo_group() -> Iterator[None]:
    """A real single-process gloo group: DeepSpeedConfig reads the rank and world from it (without
    one it silently falls back to world size 1 and never checks the DP identity)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ds_dist.init_distributed(
        dist_backend="gloo",
        auto_mpi_discovery=False,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=60),
        verbose=False,
    )
    yield
    torch_dist.destroy_process_group()
    # deepspeed.comm keeps its backend object: later in-process users must see no group either.
    ds_comm.cdb = None


requests = st.builds(
    lambda model, nodes, per_node, gpu_type, precision, method, batch_factor, pins: PlanRequest(
        model=preset(model),
        cluster=Cluster(nodes, per_node, gpu(gpu_type)),
        training=TrainingSettings(
            method=method,
            precision=precision,
            sequence_length=2048,
            global_batch_size=nodes * per_node * batch_factor,
        ),
        pins=pins,
    ),
    model=st.sampled_from(MODELS),
    nodes=st.sampled_from([1, 2, 4]),
    per_node=st.sampled_from([1, 2, 4, 8]),
    gpu_type=st.sampled_from(GPU_TYPES),
    precision=st.sampled_from(["bf16", "fp16", "bf16-pure", "fp32"]),
    method=st.sampled_from(["full", "full", "lora", "inference"]),
    batch_factor=st.sampled_from([1, 2, 4, 8]),
    pins=st.builds(
        Pins,
        tp=st.none() | st.sampled_from([1, 2, 4]),
        pp=st.none() | st.sampled_from([1, 2]),
        zero_stage=st.none() | st.sampled_from([0, 1, 2, 3]),
        offload=st.none() | st.sampled_from(["none", "optimizer", "all"]),
    ),
)


def parse(config: dict[str, Any], tp: int, pp: int, dp: int) -> DeepSpeedConfig:
    parsed = DeepSpeedConfig(config, mpu=Mpu(tp, pp, dp))
    # The mpu path was taken: DeepSpeed's world is the layout's DP degree, not its 1-rank fallback.
    assert parsed.world_size == dp
    return parsed


def field_value(model: Any, key: str) -> Any:
    """The value of a DeepSpeed config model field given by its JSON key (a name or an alias);
    nested models as the dict they were written as."""
    for name, info in type(model).model_fields.items():
        if key in (name, info.alias):
            value = getattr(model, name)
            if hasattr(value, "model_dump"):
                return {k: field_value(value, k) for k in value.model_dump(by_alias=True) if k in WRITTEN}
            return value
    raise AssertionError(f"{type(model).__name__} has no field {key!r}")


# The offload sub-keys the operator writes (the rest of the sub-model are DeepSpeed's defaults).
WRITTEN = ("device", "pin_memory")


def check_sub_configs(parsed: DeepSpeedConfig, config: dict[str, Any], zero_stage: int) -> None:
    zero = parsed.zero_config
    assert zero.stage == zero_stage == parsed.zero_optimization_stage
    section = config["zero_optimization"]
    assert (zero.offload_optimizer is not None) == ("offload_optimizer" in section)
    if zero.offload_optimizer is not None:
        assert zero.offload_optimizer.device == "cpu"
        assert zero.offload_optimizer.pin_memory == section["offload_optimizer"]["pin_memory"]
    assert (zero.offload_param is not None) == ("offload_param" in section)
    if zero.offload_param is not None:
        assert zero.offload_param.device == "cpu"
    # Every key of the section arrived in DeepSpeed's pydantic model (by field name or alias).
    for key, value in section.items():
        assert field_value(zero, key) == value, key
    assert parsed.bfloat16_config.enabled == bool(config.get("bf16", {}).get("enabled"))
    assert parsed.float16_config.enabled == bool(config.get("fp16", {}).get("enabled"))
    if "activation_checkpointing" in config:
        ac = parsed.activation_checkpointing_config
        assert ac.partition_activations == config["activation_checkpointing"]["partition_activations"]
    if "tensor_parallel" in config:
        assert parsed.tensor_parallel_config.autotp_size == config["tensor_parallel"]["autotp_size"]
    if "optimizer" in config:
        assert parsed.optimizer_name == config["optimizer"]["type"].lower()
        assert parsed.optimizer_params["lr"] == config["optimizer"]["params"]["lr"]
    else:
        assert parsed.optimizer_name is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(request=requests)
def test_planner_layouts_parse_in_deepspeed_with_the_real_dp_world(request: PlanRequest) -> None:
    try:
        result = plan(request)
    except PlanInputError:
        reject()  # a pin combination the planner refuses up front (its own tests cover those)
    evaluations = [e for e in (result.choice, *result.alternatives) if e is not None]
    assume(evaluations)
    for evaluation in evaluations:
        layout = evaluation.layout
        # Coverage shown by `pytest --hypothesis-show-statistics`.
        event(f"dp>1={layout.dp > 1} tp={layout.tp} pp={layout.pp}")
        event(f"zero={layout.zero_stage} offload={layout.offload} {request.training.precision}")
        doc = layout_document(request, evaluation)
        operator_config = doc["deepspeed"]

        # The operator's ds_config.json, as DeepSpeed on a GPU would read it.
        parsed = parse(operator_config, layout.tp, layout.pp, layout.dp)
        assert parsed.train_batch_size == layout.micro_batch * layout.grad_accum * layout.dp
        assert parsed.train_batch_size == request.global_batch_size
        assert parsed.train_micro_batch_size_per_gpu == layout.micro_batch
        assert parsed.gradient_accumulation_steps == layout.grad_accum
        check_sub_configs(parsed, operator_config, layout.zero_stage)

        # The trainer's adaptation of it (CPU ranks, as in the tests and the demo).
        trainer_layout = contract.parse_layout(doc)
        adapted = dsconfig.adapt(operator_config, trainer_layout, on_cpu=True).config
        parsed = parse(adapted, trainer_layout.tp, trainer_layout.pp, trainer_layout.dp)
        assert parsed.train_batch_size == layout.micro_batch * layout.grad_accum * layout.dp
        check_sub_configs(parsed, adapted, layout.zero_stage)


def test_deepspeed_rejects_a_batch_that_breaks_the_identity() -> None:
    """The check above has teeth: with DP 4, a train_batch_size written for DP 1 is refused."""
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}
    with pytest.raises(AssertionError, match="world_size"):
        DeepSpeedConfig(config, mpu=Mpu(1, 1, 4))
