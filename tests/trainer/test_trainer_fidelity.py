"""Planner fidelity: each rank's measured model-state bytes agree with the plan within 5%.

The layouts come from ``shardwise plan JOB.yaml --tp --pp --zero ... --layout-out`` (the
operator's planner, same architecture); the prediction is
``predicted.per_stage[stage].model_state_bytes``. The trainer measures the parameter, gradient
and optimizer-state tensors each rank really holds (storages counted once; ZeRO partitions,
fp32 master partitions and Adam moments included; see shardwise_trainer/stats.py).

The counts include what DeepSpeed really keeps beyond the ZeRO paper's table: its ZeRO
optimizers hold an fp32 master copy of their partition even when the weights are fp32 (the
planner models it: optimizer states of 12 bytes per parameter / dp for fp32 with ZeRO >= 1).
"""

from __future__ import annotations

import json

import pytest
from trainer_runner import RunCache

pytestmark = pytest.mark.trainer

RTOL = 0.05


@pytest.mark.parametrize(
    "name",
    [
        "single",
        "dp2-zero1",
        "dp2-zero2",
        "dp2-zero3",
        "tp2",
        "pp2",
        "tp2-dp2",
        "pp2-dp2",
        "gpt-single",
        "gpt-tp2",
        "gpt-pp2",
    ],
)
def test_measured_model_states_match_plan(trainer_runs: RunCache, name: str) -> None:
    result = trainer_runs.run(name, 10)
    if trainer_runs.layout_source.get(name) != "planner":
        pytest.skip("`shardwise plan` is not available: hand-written layout has no prediction")
    doc = json.loads(trainer_runs.layout_path(name).read_text())
    predicted = {int(s["stage"]): int(s["model_state_bytes"]) for s in doc["predicted"]["per_stage"]}
    rows = []
    for r in result.ranks:
        pred = predicted[int(r["stage"])]
        rows.append((r["rank"], r["stage"], r["model_state_bytes"], pred, r["model_state_bytes"] / pred - 1))
    table = "\n".join(f"rank {a} stage {b}: measured {c} predicted {d} ({e:+.1%})" for a, b, c, d, e in rows)
    print(f"\n{name}\n{table}")
    assert len(rows) == doc["layout"]["tp"] * doc["layout"]["pp"] * doc["layout"]["dp"]
    assert all(abs(err) <= RTOL for *_, err in rows), f"{name}:\n{table}"
