"""The planner's model-state terms held against DeepSpeed's own ZeRO estimators (same inputs)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from shardwise.planner import Cluster, PlanRequest, gpu, preset
from shardwise.planner.memory import (
    ModelContext,
    PrecisionBytes,
    StageCounts,
    model_context,
    overhead_terms,
    stage_counts,
    stage_model_states,
)

# --- DeepSpeed's estimators (memory-model.md §2) -------------------------------------------------
#
# Conventions that differ, held here explicitly:
# * their ZeRO-2 figure is 2P + 18P/N: 18 = 2 (bf16 grads) + 16, i.e. K = 16 (the fp32 gradient
#   copy counted with the optimizer); the paper (and our default) uses K = 12;
# * their ZeRO-3 figure is 18P/N + 4·largest_layer: 18 = 2 + 2 + K with K = 14; the 4·largest
#   layer is our "zero3_gathered_module" overhead term (16-bit weights + gradient of one module);
# * their CPU figures multiply by additional_buffer_factor = 1.5; we count no such factor.

deepspeed_zero: Any = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
deepspeed_zero3: Any = pytest.importorskip("deepspeed.runtime.zero.stage3")


def _with_k(k: int) -> tuple[ModelContext, StageCounts]:
    ctx = model_context(PlanRequest(model=preset("llama-2-7b"), cluster=Cluster(1, 8, gpu("H100"))))
    ctx = dataclasses.replace(ctx, precision=PrecisionBytes(2, 2, k, 2, 4, 2))
    return ctx, stage_counts(ctx, 1, 1)[0]


@pytest.mark.parametrize(("nodes", "per_node"), [(1, 1), (1, 8), (4, 8), (8, 8)])
def test_zero2_matches_deepspeed_estimator_with_k16(nodes: int, per_node: int) -> None:
    ctx, c = _with_k(16)
    n = nodes * per_node
    w, g, o, _ = stage_model_states(ctx, c, n, 2, "none")
    _, gpu_mem = deepspeed_zero.estimate_zero2_model_states_mem_needs(
        c.params, per_node, nodes, cpu_offload=False
    )
    assert w + g + o == gpu_mem


@pytest.mark.parametrize("per_node", [1, 2, 4])
def test_zero2_offload_matches_deepspeed_estimator(per_node: int) -> None:
    ctx, c = _with_k(12)
    w, g, o, host = stage_model_states(ctx, c, per_node, 2, "optimizer")
    cpu_mem, gpu_mem = deepspeed_zero.estimate_zero2_model_states_mem_needs(
        c.params, per_node, 1, cpu_offload=True
    )
    assert w + g + o == gpu_mem
    assert host * per_node * 1.5 == pytest.approx(cpu_mem, rel=1e-9)  # 16P per node x their 1.5


@pytest.mark.parametrize(
    ("offload", "k", "flags"),
    [("none", 14, (False, False)), ("optimizer", 12, (True, False)), ("all", 12, (True, True))],
)
@pytest.mark.parametrize(("nodes", "per_node"), [(1, 8), (2, 8)])
def test_zero3_matches_deepspeed_estimator(
    offload: str, k: int, flags: tuple[bool, bool], nodes: int, per_node: int
) -> None:
    cpu_offload, cpu_offload_params = flags
    ctx, c = _with_k(k)
    n = nodes * per_node
    w, g, o, host = stage_model_states(ctx, c, n, 3, offload)
    gathered = dict(overhead_terms(ctx, c, n, 3, n))["zero3_gathered_module"]
    cpu_mem, gpu_mem, largest = deepspeed_zero3.estimate_zero3_model_states_mem_needs(
        c.params, c.largest_module, per_node, nodes, cpu_offload, cpu_offload_params, zero_init=True
    )
    assert gathered == largest
    assert w + g + o + gathered == gpu_mem
    if cpu_offload:
        assert host * per_node * 1.5 == pytest.approx(cpu_mem, rel=1e-9)
