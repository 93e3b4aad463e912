"""The trainer's capability table against the planner and the admission check.

The table lives on the trainer side (shardwise_trainer.capabilities); the operator keeps a
byte-identical copy (it never imports the trainer). These tests hold the copy equal, check that
every layout the planner can return is one the table runs, and that what the table does not
run is refused at plan time with a reason naming the limit.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardwise import lifecycle, podstate
from shardwise.inventory import Shape
from shardwise.planner import Cluster, Pins, PlanRequest, TrainingSettings, gpu, plan, preset
from shardwise.planner import capabilities as operator_caps
from shardwise.planner.errors import PlanInputError
from shardwise.planner.methods import lora_params_per_layer
from shardwise.planning import plan_job
from shardwise.podstate import PodFailure
from shardwise_trainer import capabilities as trainer_caps
from shardwise_trainer import contract

ROOT = Path(__file__).resolve().parents[2]


def test_the_operator_copy_is_the_trainer_table_byte_for_byte() -> None:
    ours = ROOT / "operator/shardwise/planner/capabilities.py"
    theirs = ROOT / "trainer_image/shardwise_trainer/capabilities.py"
    assert ours.read_bytes() == theirs.read_bytes(), (
        "copy trainer_image/.../capabilities.py over the operator's"
    )
    assert [dataclasses.astuple(c) for c in operator_caps.TABLE] == [
        dataclasses.astuple(c) for c in trainer_caps.TABLE
    ]


def _runnable(request: PlanRequest, layout: Any, method: str | None = None) -> str | None:
    method = method or request.training.method
    return trainer_caps.refusal(
        method=method,
        model=trainer_caps.model_source_for(method, request.training.pretrained),
        tp=layout.tp,
        pp=layout.pp,
        sequence_parallel=layout.sequence_parallel,
        zero_stage=layout.zero_stage,
        offload=layout.offload,
        family=request.model.architecture.family if request.model.architecture else None,
        vision_tower=bool(request.model.architecture and request.model.architecture.extra_parameters > 0),
    )


@st.composite
def _requests(draw: st.DrawFn) -> PlanRequest:
    model = draw(st.sampled_from(["llama-2-7b", "qwen2-7b", "chatglm3-6b", "qwen2-vl-72b", "llama-2-70b"]))
    method = draw(st.sampled_from(["full", "lora", "qlora", "freeze", "inference"]))
    gpus_per_node = draw(st.sampled_from([1, 2, 4, 8]))
    nodes = draw(st.sampled_from([1, 2, 4]))
    pins = Pins(
        tp=draw(st.sampled_from([None, None, 1, 2])),
        pp=draw(st.sampled_from([None, None, 1, 2])),
        zero_stage=draw(st.sampled_from([None, None, 0, 1, 2, 3])),
        offload=draw(st.sampled_from([None, None, "none", "optimizer", "all"])),
    )
    return PlanRequest(
        model=preset(model),
        cluster=Cluster(nodes, gpus_per_node, gpu(draw(st.sampled_from(["RTX-4090", "A100-80GB", "H100"])))),
        training=TrainingSettings(
            method=method,
            sequence_length=draw(st.sampled_from([512, 2048])),
            global_batch_size=draw(st.sampled_from([None, 16, 64])),
            pretrained=draw(st.booleans()),
        ),
        pins=pins,
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests())
def test_every_layout_the_planner_returns_is_one_the_trainer_runs(request: PlanRequest) -> None:
    try:
        result = plan(request)
    except Exception as exc:  # invalid pins are input errors, not layouts
        assert type(exc).__name__ in ("PlanInputError",), exc
        return
    if result.feasible and result.choice is not None:
        for evaluation in (result.choice, *result.alternatives):
            assert _runnable(request, evaluation.layout) is None, evaluation.layout
    if result.diagnosis is not None:
        for way in result.diagnosis.ways_out:
            # A LoRA / QLoRA way out plans that method instead of the request's.
            method = way.kind if way.kind in ("lora", "qlora") else None
            assert _runnable(request, way.layout, method) is None, way


# The planner's whole option space on one small cluster: every pin value (None = planned) of
# every knob, every method and model source, on a GPU small enough that ZeRO, offload, TP and PP
# all come into play. Hypothesis above samples bigger clusters; this walk misses no combination.
_WALK_PINS = list(
    itertools.product(
        [None, 1, 2, 4],  # tp
        [None, 1, 2],  # pp
        [None, False, True],  # Megatron sequence parallelism
        [None, 0, 1, 2, 3],  # ZeRO
        [None, "none", "optimizer", "all"],  # offload
    )
)


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "freeze", "inference"])
@pytest.mark.parametrize("pretrained", [False, True])
def test_the_planner_option_space_walk_returns_only_table_rows(method: str, pretrained: bool) -> None:
    cluster = Cluster(2, 4, gpu("RTX-4090"))
    returned = 0
    for tp, pp, sp, zero, offload in _WALK_PINS:
        request = PlanRequest(
            model=preset("llama-2-7b"),
            cluster=cluster,
            training=TrainingSettings(
                method=method, sequence_length=1024, global_batch_size=16, pretrained=pretrained
            ),
            pins=Pins(tp=tp, pp=pp, sequence_parallel=sp, zero_stage=zero, offload=offload),
        )
        try:
            result = plan(request)
        except PlanInputError:
            continue
        layouts = [e.layout for e in (result.choice, *result.alternatives) if e is not None]
        if result.feasible:
            for layout in layouts:
                assert _runnable(request, layout) is None, (request.pins, layout)
                returned += 1
        if result.diagnosis is not None:
            for way in result.diagnosis.ways_out:
                way_method = way.kind if way.kind in ("lora", "qlora") else None
                assert _runnable(request, way.layout, way_method) is None, (request.pins, way)
    if trainer_caps.rows(method, trainer_caps.model_source_for(method, pretrained)):
        assert returned, f"{method} (pretrained={pretrained}): the walk planned nothing"


_AUTOTP: dict[str, Any] = {"method": "full", "model": "pretrained", "tp": 2}
_ULYSSES: dict[str, Any] = {"method": "full", "model": "pretrained", "sp": 2, "family": "llama"}


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"method": "lora", "model": "pretrained", "tp": 2}, "tp=2: LoRA runs data parallel"),
        ({"method": "full", "model": "pretrained", "pp": 2}, "pp=2: a pretrained model runs data parallel"),
        ({**_AUTOTP, "zero_stage": 3, "family": "llama"}, "ZeRO stage 3 with tp=2"),
        ({**_AUTOTP, "offload": "optimizer", "family": "llama"}, "offload=optimizer with tp=2"),
        ({**_AUTOTP, "family": "chatglm"}, "tp=2 for model family chatglm"),
        ({**_AUTOTP, "family": "qwen2", "vision_tower": True}, "tp=2 for a model with a vision tower"),
        ({"method": "full", "model": "builtin", "tp": 2, "sequence_parallel": True}, "sequence parallelism"),
        ({"method": "qlora", "model": "pretrained", "zero_stage": 3, "offload": "all"}, "offload=all"),
        ({"method": "lora", "model": "builtin"}, "needs a pretrained model"),
        ({"method": "inference", "model": "pretrained"}, "method inference"),
        ({"method": "full", "model": "builtin", "pp": 2, "zero_stage": 1, "offload": "optimizer"}, "pp=1"),
        ({**_ULYSSES, "model": "builtin"}, "sp=2: Ulysses sequence parallelism runs for full and LoRA"),
        ({**_ULYSSES, "method": "qlora"}, "sp=2: Ulysses sequence parallelism runs for full and LoRA"),
        ({**_ULYSSES, "tp": 2}, "sp=2 with tp=2, pp=1: Ulysses sequence parallelism runs with tp=1"),
        ({**_ULYSSES, "zero_stage": 0}, "ZeRO stage 0 with sp=2"),
        ({**_ULYSSES, "zero_stage": 3, "offload": "optimizer"}, "offload=optimizer with sp=2"),
        ({**_ULYSSES, "family": "chatglm"}, "sp=2 for model family chatglm"),
        ({**_ULYSSES, "vision_tower": True}, "sp=2 for a model with a vision tower"),
    ],
)
def test_refusals_name_the_limit(kwargs: dict[str, Any], fragment: str) -> None:
    args: dict[str, Any] = {
        "tp": 1, "pp": 1, "sequence_parallel": False, "zero_stage": 2, "offload": "none", **kwargs,
    }  # fmt: skip
    reason = trainer_caps.refusal(**args)
    assert reason is not None and reason.startswith("the trainer cannot run") and fragment in reason


@pytest.mark.parametrize(
    ("method", "zero", "offload"),
    [
        ("full", 3, "all"),
        ("lora", 3, "all"),
        ("lora", 2, "optimizer"),
        ("qlora", 3, "optimizer"),
        ("freeze", 0, "none"),
    ],
)
def test_what_runs_is_not_refused(method: str, zero: int, offload: str) -> None:
    reason = trainer_caps.refusal(
        method=method,
        model="pretrained",
        tp=1,
        pp=1,
        sequence_parallel=False,
        zero_stage=zero,
        offload=offload,
    )
    assert reason is None


@pytest.mark.parametrize(
    ("method", "zero", "family"), [("full", 1, "llama"), ("full", 2, "mistral"), ("lora", 3, "qwen2")]
)
def test_a_pretrained_model_runs_ulysses_sequence_parallel(method: str, zero: int, family: str) -> None:
    reason = trainer_caps.refusal(
        method=method,
        model="pretrained",
        tp=1,
        pp=1,
        sequence_parallel=False,
        zero_stage=zero,
        offload="none",
        family=family,
        sp=4,
    )
    assert reason is None


@pytest.mark.parametrize(
    ("saved", "current", "fragment"),
    [
        ({"sp": 2, "dp": 1}, {"dp": 2}, "sp 2 -> 1, dp 1 -> 2"),
        ({"dp": 2}, {"sp": 2, "dp": 1}, "sp 1 -> 2, dp 2 -> 1"),
        ({"sp": 2, "dp": 2, "zero_stage": 1}, {"sp": 2, "dp": 2, "zero_stage": 3}, "zero_stage 1 -> 3"),
    ],
)
def test_a_sequence_parallel_checkpoint_resumes_only_at_its_layout(
    saved: dict[str, object], current: dict[str, object], fragment: str
) -> None:
    reason = trainer_caps.resume_refusal({"method": "full", **saved}, {"method": "full", **current})
    assert reason is not None and fragment in reason and "Ulysses sequence parallelism" in reason
    same = {"method": "full", "sp": 2, "dp": 2, "zero_stage": 1}
    assert trainer_caps.resume_refusal(same, dict(same)) is None


def test_lora_module_names_per_family() -> None:
    assert trainer_caps.lora_modules("qwen2", ("q", "v")) == ("q_proj", "v_proj")
    assert trainer_caps.lora_modules("chatglm", ("q", "k", "v", "o")) == ("query_key_value", "dense")
    fused = trainer_caps.lora_modules("chatglm", ("q",))
    assert isinstance(fused, str) and "name q, k, v together" in fused
    assert isinstance(trainer_caps.lora_modules("gpt", ("q",)), str)


def test_planner_counts_a_fused_lora_matrix_once() -> None:
    arch = preset("chatglm3-6b").architecture
    assert arch is not None
    h, kv, f, r = arch.hidden_size, arch.kv_dim, arch.ffn_hidden_size, 8
    qkv = r * (h + h + 2 * kv)  # one adapter on query_key_value (h -> h + 2kv)
    assert lora_params_per_layer(arch, r, ("q", "k", "v")) == qkv
    assert lora_params_per_layer(arch, r, ("gate", "up", "down")) == r * (h + 2 * f) + r * (f + h)


def _spec(**training: Any) -> dict[str, Any]:
    return {
        "model": {"preset": "llama-2-7b"},
        "training": {"sequenceLength": 1024, "globalBatchSize": 16, **training},
        "resources": {"nodes": 1, "gpusPerNode": 8, "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
    }


SHAPE = Shape(
    nodes=1,
    gpus_per_node=8,
    product="NVIDIA-H100-80GB-HBM3",
    gpu_memory_bytes=80 * 2**30,
    host_memory_bytes=None,
)


def test_admission_refuses_what_the_trainer_cannot_run() -> None:
    outcome = plan_job(_spec(method="inference"), SHAPE)
    assert not outcome.feasible and outcome.reason == "UnsupportedByRuntime"
    assert "method inference" in outcome.message
    pinned = plan_job({**_spec(method="lora"), "parallelism": {"tensor": 2}}, SHAPE)
    assert not pinned.feasible and pinned.reason == "UnsupportedByRuntime"
    assert "tp=2" in pinned.message


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_a_pretrained_model_runs_tensor_parallel_with_autotp(family: str, zero: int) -> None:
    reason = trainer_caps.refusal(
        method="full", model="pretrained", tp=4, pp=1, sequence_parallel=False,
        zero_stage=zero, offload="none", family=family,
    )  # fmt: skip
    assert reason is None


def test_admission_plans_tensor_parallel_for_a_pretrained_llama() -> None:
    spec = {**_spec(method="full"), "model": {"preset": "llama-2-7b", "path": "/models/llama"}}
    outcome = plan_job({**spec, "parallelism": {"tensor": 2}}, SHAPE)
    assert outcome.feasible and outcome.document is not None, outcome.message
    layout = outcome.document["layout"]
    assert layout["tp"] == 2 and layout["zero_stage"] in (0, 1, 2) and layout["offload"] == "none"
    assert outcome.document["training"]["model_source"] == "pretrained"
    parsed = contract.parse_layout(json.loads(json.dumps(outcome.document)))
    assert contract.runtime_refusal(parsed, pretrained=True) is None


def test_admission_refuses_tensor_parallel_for_a_pretrained_model_with_a_vision_tower() -> None:
    spec = {**_spec(method="full"), "model": {"preset": "qwen2-vl-72b", "path": "/models/qwen2-vl"}}
    outcome = plan_job({**spec, "parallelism": {"tensor": 2}}, SHAPE)
    assert not outcome.feasible and outcome.reason == "UnsupportedByRuntime", outcome.message
    assert "vision tower" in outcome.message


def test_admission_plans_lora_data_parallel() -> None:
    outcome = plan_job(_spec(method="lora", loraRank=8, loraAlpha=32, loraDropout=0.05), SHAPE)
    assert outcome.feasible and outcome.document is not None
    training = outcome.document["training"]
    assert (training["lora_alpha"], training["lora_dropout"], training["model_source"]) == (
        32.0,
        0.05,
        "pretrained",
    )
    assert outcome.document["layout"]["tp"] == outcome.document["layout"]["pp"] == 1
    parsed = contract.parse_layout(json.loads(json.dumps(outcome.document)))
    assert contract.runtime_refusal(parsed, pretrained=True) is None
    assert (parsed.lora_rank, parsed.lora_alpha, parsed.lora_dropout) == (8, 32.0, 0.05)


def test_freeze_layout_names_the_first_trainable_layer() -> None:
    outcome = plan_job(_spec(method="freeze", trainableFraction=0.25), SHAPE)
    assert outcome.feasible and outcome.document is not None
    assert outcome.document["training"]["first_trainable_layer"] == 24  # last 8 of 32 layers train
    assert contract.parse_layout(outcome.document).first_trainable_layer == 24


def test_the_trainer_success_message_names_the_output_path() -> None:
    terminated = {"exitCode": 0, "message": contract.success_message("/output/my adapter")}
    pod = {"status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]}}
    assert podstate.trainer_output(pod) == "/output/my adapter"


def test_the_trainer_termination_message_names_the_failure_reason() -> None:
    text = contract.termination_message(2, contract.REASON_INVALID_MODEL, "--hf-model /m: no weight files")
    failure = PodFailure(pod="p", node="n", exit_code=1, reason="Error", message=text, disrupted=False)
    assert lifecycle.effective_exit_code(failure) == 2
    assert lifecycle.trainer_reason(failure) == ("InvalidModel", "--hf-model /m: no weight files")
    assert lifecycle.classify(failure, {}).verdict == "permanent"
    plain = PodFailure(pod="p", node="n", exit_code=1, reason="Error", message="Traceback", disrupted=False)
    assert lifecycle.trainer_reason(plain) is None
