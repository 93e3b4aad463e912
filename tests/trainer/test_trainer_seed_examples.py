"""The seed examples, on tiny stand-ins: each real-size manifest in examples/ is planned at its
real size, and the layout knobs that plan chose (ZeRO stage, offload, activation checkpointing)
together with the manifest's own method, LoRA rank and targets, data format, packing and
validation split run on a tiny model of the same family, on chat records, under torchrun (DP2).

* ChatGLM3-6B LoRA 8K on one 24 GB card (ZeRO-2): remote modelling code, fused query_key_value;
* Qwen2-VL-72B LoRA on 8 x 4090 (ZeRO-3, parameters and optimizer offloaded): the vision tower
  counted and frozen;
* Qwen2-VL-72B QLoRA on 8 x 4090 (ZeRO-3): a 4-bit NF4 base.

Each must finish, lower its loss, report its validation loss and write the adapter.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import finetune_layouts as fl
import pytest
import yaml
from tests import tiny_models
from trainer_runner import run_trainer

pytestmark = pytest.mark.trainer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STEPS = 6
QWEN2_VL_ARCH = {
    **tiny_models.SPEC_ARCH["llama"],
    "family": "qwen2",
    "qkvBias": True,
    "extraParameters": 71008,
}
#: example -> (stand-in model, its architecture in the spec, extra trainer flags)
CASES: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "chatglm3-6b-lora-8k-zero2.yaml": ("chatglm", tiny_models.SPEC_ARCH["chatglm"], ("--trust-remote-code",)),
    "qwen2-vl-72b-lora-8x4090.yaml": ("qwen2-vl", QWEN2_VL_ARCH, ()),
    "qwen2-vl-72b-qlora-8x4090.yaml": ("qwen2-vl", QWEN2_VL_ARCH, ()),
}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seed-stand-ins")
    return {
        "chatglm": tiny_models.chatglm(root / "chatglm"),
        "qwen2-vl": tiny_models.with_chat_template(tiny_models.qwen2_vl(root / "qwen2-vl")),
        "records": tiny_models.write_jsonl(root / "chat.jsonl", tiny_models.chat_records(120)),
    }


def _real_size_layout(example: Path, tmp_path: Path) -> dict[str, Any]:
    """The layout `shardwise plan` gives the example at its real size (model, GPUs, sequence)."""
    out = tmp_path / "real.json"
    cmd = [sys.executable, "-m", "shardwise.cli", "plan", str(example), "--layout-out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    layout: dict[str, Any] = json.loads(out.read_text())["layout"]
    return layout


@pytest.mark.parametrize("example", sorted(CASES))
def test_a_seed_example_runs_on_a_tiny_stand_in_of_its_family(
    example: str, stand_ins: dict[str, Path], tmp_path: Path
) -> None:
    model, arch, extra = CASES[example]
    manifest = yaml.safe_load((EXAMPLES / example).read_text())
    spec = manifest["spec"]
    real = _real_size_layout(EXAMPLES / example, tmp_path)

    training = copy.deepcopy(spec["training"])
    # Tiny sizes; fp32 except where the method needs low precision (QLoRA computes in bf16).
    training.update(sequenceLength=64, globalBatchSize=4, learningRate=fl.LR)
    training["precision"] = "bf16" if training["method"] == "qlora" else "fp32"
    job = fl.manifest(arch, training.pop("method"), training.pop("precision"), **training)
    offload = real["offload"]
    if training.get("offload") not in (None, "auto"):
        offload = training["offload"]
    layout = tmp_path / "stand-in.json"
    doc = fl.plan_layout(
        layout,
        job,
        gpus=2,
        zero=real["zero_stage"],
        micro_batch=1,
        offload=offload,
        checkpointing=real["checkpointing"],
    )
    planned = doc["layout"]
    assert (planned["zero_stage"], planned["offload"], planned["checkpointing"]) == (
        real["zero_stage"],
        offload,
        real["checkpointing"],  # "full" for all three: ChatGLM's remote code recomputes by the fallback
    )

    data = spec["data"]
    out = tmp_path / "out"
    args = (
        "--hf-model", str(stand_ins[model]), "--output-dir", str(out),
        "--data", str(stand_ins["records"]), "--data-format", data["format"], "--packing", data["packing"],
        "--validation-fraction", str(data["validation"]["fraction"] * 5),  # a few rows of 120 records
        "--eval-every", str(STEPS // 2), *extra,
    )  # fmt: skip
    result = run_trainer(layout, nproc=2, steps=STEPS, args=args)

    losses = result.losses
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert min(losses[s] for s in (STEPS - 1, STEPS)) < losses[1], losses
    evals = result.events.get("eval") or []
    assert [e["step"] for e in evals][-1] == STEPS and all(e["loss"] > 0 for e in evals), evals
    assert result.events["model"][0]["trainable_parameters"] > 0
    if training.get("loraRank"):
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == spec["training"]["loraRank"]
        assert (out / "adapter_model.safetensors").is_file()
    if model == "qwen2-vl":
        assert "visual" in str(json.loads((out / "adapter_config.json").read_text()).get("exclude_modules"))
    if spec["training"]["method"] == "qlora":
        assert result.events["model"][0]["weights_4bit"] > 0
