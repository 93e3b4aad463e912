"""Restart: a run killed after a checkpoint resumes from it and continues the same loss curve.

The first attempt (DP2, ZeRO-1; and PP2 for DeepSpeed's per-layer pipeline checkpoints) saves
every 4 steps and is SIGKILLed (the whole torchrun process group, as a node loss would) once the
step-4 checkpoint is written; rank 0 is slowed by the test-only switch so the kill lands before
the run ends. The second attempt with the same arguments resumes from step 4 and must print
steps 5..10 with the losses of an uninterrupted run (same tolerance as the equivalence tests).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_trainer_equivalence import TOLERANCE
from trainer_runner import (
    LAYOUTS,
    RUN_TIMEOUT,
    RunCache,
    nproc_of,
    run_failing,
    run_trainer,
    torchrun_cmd,
    trainer_env,
)

pytestmark = pytest.mark.trainer

STEPS = 10
EVERY = 4


def _kill_after_checkpoint(cmd: list[str], env: dict[str, str], step: int) -> list[int]:
    """Start torchrun, SIGKILL its process group once the step-``step`` checkpoint is reported."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True
    )
    seen: list[int] = []
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                obj = json.loads(line)
                if obj.get("event") == "step":
                    seen.append(int(obj["step"]))
                if obj.get("event") == "checkpoint" and int(obj["step"]) == step:
                    break
            if time.monotonic() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return seen


@pytest.mark.parametrize("name", ["dp2-zero1", "pp2"])
def test_killed_run_resumes_same_curve(trainer_runs: RunCache, tmp_path: Path, name: str) -> None:
    reference = trainer_runs.run(name, STEPS).losses
    layout = trainer_runs.layout_path(name)
    nproc = nproc_of(LAYOUTS[name])
    ckpt = tmp_path / "ckpt"
    args = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", str(EVERY))
    # Rank 0 sleeps 20x its step time after each step: the run cannot finish before the kill.
    first = _kill_after_checkpoint(
        torchrun_cmd(nproc, layout, STEPS, *args), trainer_env({"SHARDWISE_TEST_SLOW_RANK": "0:20"}), EVERY
    )
    assert first[-1] < STEPS, f"the first attempt was not killed before the end: steps {first}"
    assert (ckpt / "latest").read_text().strip() == f"step{EVERY}"

    resumed = run_trainer(layout, nproc=nproc, steps=STEPS, args=args)
    assert resumed.done["resumed_from"] == EVERY
    assert sorted(resumed.losses) == list(range(EVERY + 1, STEPS + 1))
    diffs = {s: abs(loss - reference[s]) for s, loss in resumed.losses.items()}
    assert max(diffs.values()) <= TOLERANCE, diffs


#: (written at, resumed at): a checkpoint resumes at another DP size / ZeRO stage / TP size through
#: DeepSpeed's universal conversion, made automatically by the trainer.
#: A ZeRO-3 checkpoint resumes with its Adam step, at ZeRO-0 and at ZeRO-2, and back: the trainer
#: completes DeepSpeed's ZeRO-3 conversion (universal._complete_zero3_conversion) and names the
#: engine state as the other stage's loader looks for it (universal._alias_engine_state).
ACROSS = [
    ("dp2-zero2", "single"),
    ("dp2-zero1", "single"),
    ("single", "dp2-zero2"),
    ("dp2-zero3", "single"),
    ("dp2-zero3", "dp2-zero2"),
    ("dp2-zero2", "dp2-zero3"),
    # TP size: the slices merge by the model's saved TP patterns and re-split at the new size,
    # without ZeRO (the trainer's own conversion) and with ZeRO-1 (DeepSpeed's).
    ("tp2", "single"),
    ("single", "tp2"),
    ("tp2-dp2", "dp2-zero1"),
    ("dp2-zero1", "tp2-dp2"),
    # Pipeline depth: stages map to the plain model's parameter names (tied embeddings too),
    # without ZeRO and with ZeRO-1, both ways.
    ("pp2", "single"),
    ("single", "pp2"),
    ("pp2-dp2", "dp2-zero1"),
    ("dp2-zero1", "pp2-dp2"),
    ("gpt-pp2", "gpt-single"),
]


@pytest.mark.parametrize(("saved", "resumed_at"), ACROSS)
def test_resume_at_another_layout(
    trainer_runs: RunCache, tmp_path: Path, saved: str, resumed_at: str
) -> None:
    reference = trainer_runs.run(resumed_at, STEPS).losses
    ckpt = tmp_path / "ckpt"
    args = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", str(EVERY), "--checkpoint-keep", "1")
    first = run_trainer(
        trainer_runs.layout_path(saved), nproc=nproc_of(LAYOUTS[saved]), steps=EVERY, args=args
    )
    assert first.done["steps"] == EVERY
    assert (ckpt / "latest").read_text().strip() == f"step{EVERY}"
    assert json.loads((ckpt / f"step{EVERY}" / "shardwise-layout.json").read_text())["dp"] == LAYOUTS[
        saved
    ].get("dp", 1)

    layout = trainer_runs.layout_path(resumed_at)
    resumed = run_trainer(layout, nproc=nproc_of(LAYOUTS[resumed_at]), steps=STEPS, args=args)
    assert resumed.done["resumed_from"] == EVERY
    assert sorted(resumed.losses) == list(range(EVERY + 1, STEPS + 1))
    diffs = {s: abs(loss - reference[s]) for s, loss in resumed.losses.items()}
    assert max(diffs.values()) <= TOLERANCE, diffs
    assert resumed.events["resume"][0]["universal"] is True
    # keep 1: the resumed run's own final checkpoint replaced step 4 (and its universal copy)
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step")) == [f"step{STEPS}"]


def test_a_checkpoint_that_cannot_convert_is_refused_not_restarted_at_zero(
    trainer_runs: RunCache, tmp_path: Path
) -> None:
    """TP2 -> PP2: TP and pipeline depth both change, which no conversion does, so every rank
    exits 2 with InvalidCheckpoint (rank 0 decides, the others hear it) instead of training from
    step 0."""
    ckpt = tmp_path / "ckpt"
    args = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", str(EVERY))
    run_trainer(trainer_runs.layout_path("tp2"), nproc=nproc_of(LAYOUTS["tp2"]), steps=EVERY, args=args)
    proc, text = run_failing(2, trainer_runs.layout_path("pp2"), STEPS, tmp_path, *args)
    assert proc.returncode != 0
    assert "shardwise.dev/exit-code=2" in text and "shardwise.dev/reason=InvalidCheckpoint" in text, text
    assert "tp 2 -> 1, pp 1 -> 2" in text and "step4" in text
    assert '"event": "step"' not in proc.stdout
