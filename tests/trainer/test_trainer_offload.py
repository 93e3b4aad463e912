"""ZeRO optimizer offload on CPU: DeepSpeed's CPU Adam steps it, it trains, and what each rank holds
equals the plan's GPU-resident model states plus its share of the host memory the plan puts aside
for the offloaded states."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_runner import run_trainer

pytestmark = pytest.mark.trainer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-cpu.yaml"


@pytest.mark.parametrize("zero", [1, 2])
def test_optimizer_offload_trains_and_matches_the_plan(tmp_path: Path, zero: int) -> None:
    layout = tmp_path / "layout.json"
    subprocess.run(
        [
            sys.executable, "-m", "shardwise.cli", "plan", str(EXAMPLE), "--gpus", "2",
            "--tp", "1", "--pp", "1", "--zero", str(zero), "--offload", "optimizer",
            "--layout-out", str(layout),
        ],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    doc = json.loads(layout.read_text())
    assert doc["deepspeed"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    result = run_trainer(layout, nproc=2, steps=8)

    assert {r["optimizer"] for r in result.ranks} == {"DeepSpeedCPUAdam"}
    losses = [s["loss"] for s in result.steps]
    assert len(losses) == 8
    assert losses[-1] < losses[0]
    # On CPU the "GPU" and the host are the same memory: a rank holds both parts.
    predicted = doc["predicted"]
    per_rank = predicted["per_stage"][0]["model_state_bytes"] + predicted["cpu_memory_per_node"] / 2
    for rank in result.ranks:
        assert abs(rank["model_state_bytes"] / per_rank - 1) <= 0.05, (rank, per_rank)
