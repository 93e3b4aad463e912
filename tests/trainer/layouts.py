"""Layouts for the trainer tests: ``shardwise plan --layout-out`` when the planner CLI works, else
hand-written per docs/layout-contract.md (same architecture, same knobs)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

#: The tiny model every trainer test trains (fp32, GQA, SwiGLU, RMSNorm, rope).
TINY_ARCH: dict[str, Any] = {
    "family": "llama",
    "layers": 4,
    "hidden_size": 64,
    "heads": 4,
    "kv_heads": 2,
    "ffn_hidden_size": 128,
    "vocab_size": 256,
    "mlp": "swiglu",
    "norm": "rmsnorm",
    "tied_embeddings": False,
    "dropout": False,
    "position_embedding": "rope",
    "max_sequence_length": 64,
    "qkv_bias": False,
    "extra_parameters": 0,
}
#: The GPT-style variant: GeLU, LayerNorm (biases on every linear), learned positions, tied embeddings.
GPT_ARCH: dict[str, Any] = {
    **TINY_ARCH,
    "family": "gpt",
    "heads": 4,
    "kv_heads": 4,
    "ffn_hidden_size": 256,
    "mlp": "gelu",
    "norm": "layernorm",
    "tied_embeddings": True,
    "position_embedding": "learned",
}
ARCHS = {"llama": TINY_ARCH, "gpt": GPT_ARCH}
#: AdamW learning rate per variant. The GPT variant at 3e-3 trains at the edge of stability, where
#: fp32 rounding differences between layouts grow to ~3e-4 by step 10; at 1e-3 they stay ~1e-6.
LR = {"llama": 3e-3, "gpt": 1e-3}
SEQ = 32
GLOBAL_BATCH = 4


def hand_layout(
    *,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    zero: int = 0,
    micro_batch: int = 1,
    arch: str = "llama",
    checkpointing: str = "none",
) -> dict[str, Any]:
    """A version-1 layout.json written by hand (no prediction)."""
    arch_doc = dict(ARCHS[arch])
    grad_accum = GLOBAL_BATCH // (micro_batch * dp)
    layers = arch_doc["layers"]
    per = layers // pp
    return {
        "version": 1,
        "model": {"name": "custom", "parameters": 0, "architecture": arch_doc},
        "training": {
            "method": "full",
            "precision": "fp32",
            "sequence_length": SEQ,
            "global_batch_size": GLOBAL_BATCH,
            "lora_rank": None,
            "lora_targets": [],
            "optimizer": "adamw",
        },
        "layout": {
            "tp": tp,
            "pp": pp,
            "dp": dp,
            "zero_stage": zero,
            "micro_batch": micro_batch,
            "grad_accum": grad_accum,
            "checkpointing": checkpointing,
            "sequence_parallel": False,
            "offload": "none",
            "nodes": 1,
            "gpus_per_node": tp * pp * dp,
        },
        "ranks": {"order": ["pp", "dp", "tp"], "stage_layers": [[s * per, (s + 1) * per] for s in range(pp)]},
        "predicted": {
            "gpu_memory_bytes": 0,
            "per_stage": [],
            "cpu_memory_per_node": 0,
            "step_time_seconds": 0,
        },
        "deepspeed": {
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": LR[arch], "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0},
            },
            "zero_optimization": {"stage": zero},
            "gradient_clipping": 0.0,
        },
    }


def write_layout(path: Path, **kwargs: Any) -> Path:
    path.write_text(json.dumps(hand_layout(**kwargs), indent=1))
    return path


_CAMEL = {
    "layers": "layers",
    "hidden_size": "hiddenSize",
    "heads": "heads",
    "kv_heads": "kvHeads",
    "ffn_hidden_size": "ffnHiddenSize",
    "vocab_size": "vocabSize",
    "mlp": "mlp",
    "norm": "norm",
    "tied_embeddings": "tiedEmbeddings",
    "dropout": "dropout",
    "position_embedding": "positionEmbedding",
    "max_sequence_length": "maxSequenceLength",
    "family": "family",
}


def planner_available() -> bool:
    """True when ``shardwise plan`` (the operator's CLI) is installed and answers."""
    exe = shutil.which("shardwise")
    if exe is None:
        return False
    probe = subprocess.run([exe, "plan", "--help"], capture_output=True, text=True, check=False)
    return probe.returncode == 0 and "--layout-out" in probe.stdout


def planner_layout(
    path: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    zero: int = 0,
    micro_batch: int = 1,
    arch: str = "llama",
    checkpointing: str = "none",
) -> bool:
    """Write ``shardwise plan JOB.yaml --tp --pp --zero ... --layout-out path`` for these knobs;
    False when the planner CLI is not available. The planned DeepSpeed config is kept except the
    optimizer's learning rate (the tests' LR, so the short runs learn)."""
    if not planner_available():
        return False
    arch_doc = ARCHS[arch]
    manifest = {
        "apiVersion": "shardwise.dev/v1alpha1",
        "kind": "ParallelTrainingJob",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"architecture": {camel: arch_doc[key] for key, camel in _CAMEL.items()}},
            "training": {
                "method": "full",
                "precision": "fp32",
                "sequenceLength": SEQ,
                "globalBatchSize": GLOBAL_BATCH,
            },
        },
    }
    job = path.with_suffix(".job.json")  # JSON is YAML
    job.write_text(json.dumps(manifest))
    cmd = [
        "shardwise", "plan", str(job), "--gpus", str(tp * pp * dp), "--gpu-memory", "16GiB",
        "--tp", str(tp), "--pp", str(pp), "--zero", str(zero), "--micro-batch", str(micro_batch),
        "--checkpointing", checkpointing, "--offload", "none", "--layout-out", str(path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    doc = json.loads(path.read_text())
    lay = doc["layout"]
    assert (lay["tp"], lay["pp"], lay["dp"], lay["zero_stage"]) == (tp, pp, dp, zero), lay
    doc["deepspeed"].setdefault("optimizer", {"type": "AdamW", "params": {}})["params"]["lr"] = LR[arch]
    path.write_text(json.dumps(doc, indent=1))
    return True


def make_layout(path: Path, **kwargs: Any) -> str:
    """Write the layout for these knobs; returns its source, "planner" or "hand"."""
    if planner_layout(path, **kwargs):
        return "planner"
    write_layout(path, **kwargs)
    return "hand"
