"""ZeRO-3 load-time memory per rank: a pretrained model loaded partitioned, and the built-in model
constructed partitioned, against DP — the "every card loads a full copy" failure, measured.

A Llama-style model of ~82 M parameters (hidden 768, 8 layers, FFN 2048, vocabulary 16384;
330 MB in fp32) is saved once with ``save_pretrained`` (random weights). For each layout the
trainer runs with ``--steps 0`` under ``torchrun --nproc-per-node DP`` on CPU and reports, per
rank, ``load_peak_bytes``: how much the process's peak RSS grew while the model was built
(``shardwise_trainer.build``). Rows: LoRA on the pretrained model with ZeRO-3 at DP 1 / 2 / 4
and ZeRO-2 at DP 2 (each rank holds the whole base: the contrast), and the built-in model
(full) with ZeRO-3 at DP 1 / 2 / 4.

    python benchmarks/zero3_load.py

Writes benchmarks/results/zero3_load.json and .md.
"""

# ruff: noqa: PLC0415 - torch / transformers load only to write the model
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

ARCH = {
    "family": "llama",
    "layers": 8,
    "hiddenSize": 768,
    "heads": 12,
    "kvHeads": 12,
    "ffnHiddenSize": 2048,
    "vocabSize": 16384,
    "maxSequenceLength": 64,
}
ROWS = [
    ("pretrained", "lora", 3, 1),
    ("pretrained", "lora", 3, 2),
    ("pretrained", "lora", 3, 4),
    ("pretrained", "lora", 2, 2),
    ("built-in", "full", 3, 1),
    ("built-in", "full", 3, 2),
    ("built-in", "full", 3, 4),
]
MIB = 2**20
NOTES = """Reading: the built-in model under `zero.Init` falls with DP (each rank draws a tensor, keeps its
partition). Loading a pretrained model partitioned, ranks other than 0 fall with DP too; rank 0
stays near 560 MiB because `transformers` loads a ZeRO-3 model by reading every tensor of the
checkpoint on rank 0 and scattering it into the partitions: its RSS holds the memory-mapped file
pages (312 MiB, page cache the kernel can drop) and one gathered module, not a full model copy.
The ZeRO-2 row is not a fair contrast on this metric: the fp32 weights stay memory-mapped until
first use, after the load window; what each ZeRO-2 rank holds for training is the whole model (the
model-state figures of `tests/trainer/test_trainer_finetune.py`)."""


def save_model(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=ARCH["hiddenSize"],
        intermediate_size=ARCH["ffnHiddenSize"],
        num_hidden_layers=ARCH["layers"],
        num_attention_heads=ARCH["heads"],
        num_key_value_heads=ARCH["kvHeads"],
        vocab_size=ARCH["vocabSize"],
        max_position_embeddings=ARCH["maxSequenceLength"],
    )
    LlamaForCausalLM(config).save_pretrained(str(path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(work: Path, model_dir: Path, *, source: str, method: str, zero: int, dp: int) -> list[int]:
    job = {
        "apiVersion": "shardwise.dev/v1alpha1",
        "kind": "ParallelTrainingJob",
        "metadata": {"name": "load"},
        "spec": {
            "model": {"architecture": ARCH},
            "training": {"method": method, "precision": "fp32", "sequenceLength": 32, "globalBatchSize": 4},
        },
    }
    name = f"{source}-{method}-z{zero}-dp{dp}"
    job_file, layout = work / f"{name}.yaml", work / f"{name}.json"
    job_file.write_text(yaml.safe_dump(job))
    subprocess.run(
        [sys.executable, "-m", "shardwise.cli", "plan", str(job_file), "--gpus", str(dp), "--gpu-memory",
         "64GiB", "--tp", "1", "--pp", "1", "--zero", str(zero), "--offload", "none", "--layout-out",
         str(layout)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    args = ["--hf-model", str(model_dir)] if source == "pretrained" else []
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(dp), "--rdzv-backend",
         "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "shardwise_trainer", "--layout",
         str(layout), "--steps", "0", "--synthetic-data", *args],
        capture_output=True, text=True, env=env, check=False, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"event": "rank"')]
    return [int(r["load_peak_bytes"]) for r in sorted(ranks, key=lambda r: r["rank"])]


def main() -> None:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        save_model(model_dir)
        size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        for source, method, zero, dp in ROWS:
            peaks = run(work, model_dir, source=source, method=method, zero=zero, dp=dp)
            rows.append({"model": source, "method": method, "zero": zero, "dp": dp, "load_peak_bytes": peaks})
            print(rows[-1], flush=True)
    doc = {"machine": platform.platform(), "cpus": os.cpu_count(), "weights_bytes": size, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "zero3_load.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# ZeRO-3 load-time memory per rank",
        "",
        f"Model: Llama-style, ~82 M parameters, {size / MIB:.0f} MiB of fp32 safetensors; CPU, "
        f"{os.cpu_count()} cores. `load_peak_bytes`: growth of each rank's peak RSS while the model "
        "was built (`python benchmarks/zero3_load.py`).",
        "",
        "| model | method | ZeRO | DP | load peak per rank (MiB), max over ranks | per rank |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        peaks = r["load_peak_bytes"]
        per = ", ".join(f"{p / MIB:.0f}" for p in peaks)
        lines.append(
            f"| {r['model']} | {r['method']} | {r['zero']} | {r['dp']} | {max(peaks) / MIB:.0f} | {per} |"
        )
    lines += ["", NOTES]
    (RESULTS / "zero3_load.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
