"""Runs the real trainer under a real torchrun for the trainer tests, and parses its JSON lines.

One torchrun at a time (the machine has 2 shared cores): runs are cached per (layout name,
steps, args) for the whole session, so the equivalence and the fidelity tests share them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import layouts

RUN_TIMEOUT = 300


@dataclass
class RunResult:
    """What rank 0 printed: per-step lines, per-rank summaries, the final line."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    ranks: list[dict[str, Any]] = field(default_factory=list)
    done: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[int] = field(default_factory=list)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # every line, by event
    stderr: str = ""
    seconds: float = 0.0

    @property
    def losses(self) -> dict[int, float]:
        return {int(s["step"]): float(s["loss"]) for s in self.steps}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trainer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDWISE_")}
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",  # 2 shared cores: one thread per rank
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def torchrun_cmd(nproc: int, layout: Path, steps: int, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        "-m", "shardwise_trainer",
        "--layout", str(layout), "--steps", str(steps),
        *(() if "--data" in args else ("--synthetic-data",)), *args,
    ]  # fmt: skip


def parse_output(stdout: str, result: RunResult) -> RunResult:
    for raw in stdout.splitlines():
        line = raw.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        event = obj.get("event")
        result.events.setdefault(str(event), []).append(obj)
        if event == "step":
            result.steps.append(obj)
        elif event == "rank":
            result.ranks.append(obj)
        elif event == "done":
            result.done = obj
        elif event == "checkpoint":
            result.checkpoints.append(int(obj["step"]))
    result.ranks.sort(key=lambda r: int(r["rank"]))
    return result


def run_trainer(
    layout: Path, *, nproc: int, steps: int, args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> RunResult:
    """One torchrun launch to completion; fails loudly with the trainer's stderr."""
    t0 = time.monotonic()
    proc = subprocess.run(
        torchrun_cmd(nproc, layout, steps, *args),
        capture_output=True,
        text=True,
        env=trainer_env(env),
        timeout=RUN_TIMEOUT,
        check=False,
    )
    result = parse_output(proc.stdout, RunResult(stderr=proc.stderr, seconds=time.monotonic() - t0))
    if proc.returncode != 0:
        raise AssertionError(
            f"trainer exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
        )
    return result


def run_failing(
    nproc: int, layout: Path, steps: int, tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], str]:
    """One torchrun launch expected to fail: (the process, the termination message the trainer
    wrote to an empty file, as a kubelet creates it)."""
    message = tmp_path / "termination-log"
    message.write_text("")
    proc = subprocess.run(
        torchrun_cmd(nproc, layout, steps, *args),
        env=trainer_env({**(env or {}), "SHARDWISE_TERMINATION_LOG": str(message)}),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    return proc, message.read_text()


def run_refused(layout: Path, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """The trainer CLI alone (one process, one step) on input it must refuse: (exit code, its one
    ``shardwise-train:`` stderr line, the termination message). Fails unless exactly one such line."""
    message = tmp_path / "termination-log"
    proc = subprocess.run(
        [sys.executable, "-m", "shardwise_trainer", "--layout", str(layout), "--steps", "1", *args],
        capture_output=True,
        text=True,
        env=trainer_env({"SHARDWISE_TERMINATION_LOG": str(message), "HF_HUB_OFFLINE": "1"}),
        timeout=RUN_TIMEOUT,
        check=False,
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("shardwise-train:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return proc.returncode, lines[0], message.read_text() if message.exists() else ""


#: name -> (layout knobs, nproc); every layout trains the same model on the same global batch.
LAYOUTS: dict[str, dict[str, Any]] = {
    "single": {"micro_batch": 2},
    "dp2-zero1": {"dp": 2, "zero": 1},
    "dp2-zero2": {"dp": 2, "zero": 2},
    "dp2-zero3": {"dp": 2, "zero": 3},
    "tp2": {"tp": 2, "micro_batch": 2},
    "pp2": {"pp": 2},
    "tp2-dp2": {"tp": 2, "dp": 2, "zero": 1},
    "pp2-dp2": {"pp": 2, "dp": 2, "zero": 1},
    # GPT-style variant: GeLU, LayerNorm (+ biases), learned positions, tied embeddings, full
    # activation checkpointing; under TP2 and PP2 (TiedLayerSpec across the two stages).
    "gpt-single": {"micro_batch": 2, "arch": "gpt"},
    "gpt-tp2": {"tp": 2, "micro_batch": 2, "arch": "gpt", "checkpointing": "full"},
    "gpt-pp2": {"pp": 2, "arch": "gpt"},
}


def nproc_of(knobs: dict[str, Any]) -> int:
    return int(knobs.get("tp", 1)) * int(knobs.get("pp", 1)) * int(knobs.get("dp", 1))


class RunCache:
    """Session cache of trainer runs, keyed by layout name and step count."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.runs: dict[tuple[str, int], RunResult] = {}
        self.layout_source: dict[str, str] = {}

    def layout_path(self, name: str) -> Path:
        path = self.workdir / f"{name}.json"
        if not path.exists():
            self.layout_source[name] = layouts.make_layout(path, **LAYOUTS[name])
        return path

    def run(self, name: str, steps: int = 10) -> RunResult:
        key = (name, steps)
        if key not in self.runs:
            self.runs[key] = run_trainer(self.layout_path(name), nproc=nproc_of(LAYOUTS[name]), steps=steps)
        return self.runs[key]
