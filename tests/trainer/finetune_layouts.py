"""Layouts for the fine-tuning tests: a job manifest for a tiny pretrained model, planned by
``shardwise plan --layout-out`` with the knobs pinned (the planner's own numbers, not hand-made)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

SEQ = 32
GLOBAL_BATCH = 4
LR = 3e-3


def manifest(arch: dict[str, Any], method: str, precision: str = "fp32", **training: Any) -> dict[str, Any]:
    return {
        "apiVersion": "shardwise.dev/v1alpha1",
        "kind": "ParallelTrainingJob",
        "metadata": {"name": "tiny-finetune"},
        "spec": {
            "model": {"architecture": arch},
            "training": {
                "method": method,
                "precision": precision,
                "sequenceLength": SEQ,
                "globalBatchSize": GLOBAL_BATCH,
                "learningRate": LR,
                **training,
            },
        },
    }


def plan_layout(
    path: Path,
    job: dict[str, Any],
    *,
    gpus: int,
    zero: int,
    micro_batch: int,
    offload: str = "none",
    checkpointing: str = "none",
) -> dict[str, Any]:
    """Write the planned layout.json to ``path`` and return it."""
    job_file = path.with_suffix(".job.yaml")
    job_file.write_text(yaml.safe_dump(job))
    cmd = [
        sys.executable, "-m", "shardwise.cli", "plan", str(job_file), "--gpus", str(gpus),
        "--gpu-memory", "16GiB", "--tp", "1", "--pp", "1", "--zero", str(zero),
        "--micro-batch", str(micro_batch), "--offload", offload, "--checkpointing", checkpointing,
        "--layout-out", str(path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc
