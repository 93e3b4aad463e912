"""Choosing among fitting layouts: fastest, least model parallelism among near-ties, offload only
when nothing fits without it, one line per runner-up."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from shardwise.jobspec import request_from_spec
from shardwise.planner import PlannerSettings, PlanRequest, plan
from shardwise.planner.choice import NEAR_TIE, choose, explain
from shardwise.planner.cost import StepTime
from shardwise.planner.layout import Layout
from shardwise.planner.memory import MemoryBreakdown
from shardwise.planner.result import Evaluation

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str, **settings: object) -> PlanRequest:
    spec = yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))["spec"]
    request = request_from_spec(spec)
    return dataclasses.replace(request, settings=PlannerSettings(**settings))  # type: ignore[arg-type]


def _evaluation(tp: int, pp: int, seconds: float, memory: int = 10) -> Evaluation:
    layout = Layout(tp, pp, 8 // (tp * pp), 1, 1, 1, "none", False, "none", 1, 8)
    step = StepTime(seconds, 0.0, 0.0, 0.0, 0.0, 0.0)
    return Evaluation(layout, (MemoryBreakdown(memory, 0, 0, 0, 0),), ((0, 1),), 100, 0, step, ())


def test_offload_auto_is_not_chosen_when_a_layout_without_offload_fits() -> None:
    """Qwen2-VL-72B LoRA on 8 x RTX 4090 with every layout DeepSpeed allows (TP 8 fits): offload
    ranked faster by the model before; auto must not offload when TP/PP layouts fit without it."""
    result = plan(_example("qwen2-vl-72b-lora-8x4090.yaml", respect_runtime=False))
    assert result.feasible and result.choice is not None
    assert result.choice.layout.offload == "none"
    assert all(a.layout.offload == "none" for a in result.alternatives)


def test_offload_auto_offloads_when_nothing_fits_otherwise() -> None:
    """The trainer runs LoRA with TP 1 / PP 1 only: then 72 B of bf16 weights need offload."""
    request = _example("qwen2-vl-72b-lora-8x4090.yaml")
    result = plan(request)
    assert result.feasible and result.choice is not None and result.choice.layout.offload != "none"
    pinned_none = dataclasses.replace(request, pins=dataclasses.replace(request.pins, offload="none"))
    assert not plan(pinned_none).feasible


def test_near_ties_go_to_the_least_model_parallelism() -> None:
    fast_tp2 = _evaluation(2, 1, 1.00)
    near_tp1 = _evaluation(1, 1, 1.00 * (1 + NEAR_TIE / 2))
    slow_tp1 = _evaluation(1, 1, 1.00 * (1 + 2 * NEAR_TIE))
    assert choose([fast_tp2, near_tp1])[0] is near_tp1
    assert choose([fast_tp2, slow_tp1])[0] is fast_tp2
    assert choose([fast_tp2, slow_tp1, near_tp1]) == [near_tp1, fast_tp2, slow_tp1]


def test_each_runner_up_is_explained_in_one_line() -> None:
    result = plan(_example("qwen2-vl-72b-qlora-8x4090.yaml", respect_runtime=False))
    assert result.alternatives and len(result.alternative_reasons) == len(result.alternatives)
    for why in result.alternative_reasons:
        assert why and "\n" not in why
        assert why.startswith("+") or "near-tie" in why
    slower = explain(_evaluation(1, 1, 1.5, memory=5 << 30), _evaluation(1, 1, 1.0, memory=6 << 30))
    assert slower == "+50.0% step time (+0.5 s compute); 1.0 GiB less memory per GPU"
    faster = explain(_evaluation(2, 1, 0.99), _evaluation(1, 1, 1.0))
    assert "near-tie" in faster and "TP x PP = 2" in faster
