"""Every planned fine-tuning method on pretrained Hugging Face models, under torchrun on CPU.

Tiny models are built from configs with random weights and saved with ``save_pretrained``
beside a tokenizer trained offline (tiny_models.py); layouts come from ``shardwise plan``
(finetune_layouts.py). Real torch + DeepSpeed + transformers + peft + bitsandbytes; nothing is
downloaded. What is checked, per method:

* LoRA under DP2 with ZeRO-2 and ZeRO-3 gives the single-process LoRA losses (TOLERANCE, fp32);
  the trainable parameters are the planner's, exactly;
* QLoRA trains (the loss falls) on a 4-bit NF4 base, under ZeRO-2 and ZeRO-3;
* freeze leaves the frozen layers, the embedding and the head bitwise unchanged;
* the saved output (adapter, or full model) loads in a fresh process with transformers / peft
  and gives the trained model's loss on the probe batch;
* each rank's model-state bytes are within 5 % of the plan's, for each method;
* ChatGLM-style remote code (fused query_key_value) and Qwen2-VL (vision tower frozen) train;
* optimizer offload steps DeepSpeed's CPU Adam and gives the same losses as without.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import finetune_layouts as fl
import pytest
from test_trainer_equivalence import TOLERANCE
from tests import tiny_models
from trainer_runner import RunResult, run_refused, run_trainer, trainer_env

from shardwise.jobspec import request_from_spec
from shardwise.planner import gpu
from shardwise.planner.memory import model_context, stage_counts

pytestmark = pytest.mark.trainer

STEPS = 6
#: Model-state bytes per rank against the plan (the issue's bound).
STATE_TOLERANCE = 0.05
TARGETS_ALL = ["q", "k", "v", "o", "gate", "up", "down"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    return {
        "llama": tiny_models.llama(root / "llama"),
        "chatglm": tiny_models.chatglm(root / "chatglm"),
        "qwen2-vl": tiny_models.qwen2_vl(root / "qwen2-vl"),
        "data": tiny_models.skewed_tokens(root / "tokens.bin"),
    }


class Runs:
    """Session-wide cache: one torchrun per (name), layouts planned on first use."""

    def __init__(self, workdir: Path, models: dict[str, Path]) -> None:
        self.workdir, self.models = workdir, models
        self.results: dict[str, tuple[RunResult, dict[str, Any], Path]] = {}

    def run(
        self,
        name: str,
        *,
        model: str,
        job: dict[str, Any],
        gpus: int,
        zero: int,
        micro_batch: int,
        offload: str = "none",
        extra: tuple[str, ...] = (),
        sp: int = 1,
    ) -> tuple[RunResult, dict[str, Any], Path]:
        """``sp`` > 1: the planned layout with Ulysses SP added by hand (the planner does not
        choose it yet), on ``gpus * sp`` ranks."""
        if name not in self.results:
            layout = self.workdir / f"{name}.json"
            doc = fl.plan_layout(layout, job, gpus=gpus, zero=zero, micro_batch=micro_batch, offload=offload)
            if sp > 1:
                doc["layout"]["sp"] = sp
                layout.write_text(json.dumps(doc, indent=1))
            out = self.workdir / f"{name}-out"
            args = (
                "--hf-model", str(self.models[model]), "--output-dir", str(out),
                "--data", str(self.models["data"]), *extra,
            )  # fmt: skip
            result = run_trainer(layout, nproc=gpus * sp, steps=STEPS, args=args)
            self.results[name] = (result, doc, out)
        return self.results[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[Runs]:
    yield Runs(tmp_path_factory.mktemp("finetune-runs"), models)


def lora_job(model: str = "llama", **extra: Any) -> dict[str, Any]:
    return fl.manifest(tiny_models.SPEC_ARCH[model], "lora", loraRank=4, loraTargets=TARGETS_ALL, **extra)


def planned_trainable(job: dict[str, Any]) -> int:
    """The planner's trainable parameters of the job at TP1 PP1 (memory.stage_counts)."""
    request = request_from_spec(job["spec"], nodes=1, gpus_per_node=1, gpu=gpu("H100"))
    return sum(c.trainable for c in stage_counts(model_context(request), 1, 1))


def assert_states_match_plan(result: RunResult, doc: dict[str, Any]) -> None:
    predicted = doc["predicted"]["per_stage"][0]["model_state_bytes"]
    for rank in result.ranks:
        ratio = rank["model_state_bytes"] / predicted
        assert abs(ratio - 1) <= STATE_TOLERANCE, (rank, predicted)


def model_line(result: RunResult) -> dict[str, Any]:
    return result.events["model"][0]


def losses_close(a: RunResult, b: RunResult) -> None:
    assert a.losses.keys() == b.losses.keys()
    for step, loss in a.losses.items():
        assert abs(loss - b.losses[step]) <= TOLERANCE * max(1.0, abs(loss)), (step, loss, b.losses[step])


# --- LoRA ----------------------------------------------------------------------------------------


def test_lora_single_process_trains_the_planned_adapters(runs: Runs) -> None:
    job = lora_job()
    result, doc, out = runs.run("lora-single", model="llama", job=job, gpus=1, zero=0, micro_batch=2)
    model = model_line(result)
    assert model["source"] == "pretrained"
    assert model["trainable_parameters"] == planned_trainable(job) == 2 * 4 * (128 + 96 + 96 + 128 + 192 * 3)
    assert result.losses[STEPS] < result.losses[1]
    assert_states_match_plan(result, doc)
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize("zero", [2, 3])
def test_lora_dp2_gives_the_single_process_losses(runs: Runs, zero: int) -> None:
    job = lora_job()
    single, _, _ = runs.run("lora-single", model="llama", job=job, gpus=1, zero=0, micro_batch=2)
    result, doc, _ = runs.run(f"lora-dp2-z{zero}", model="llama", job=job, gpus=2, zero=zero, micro_batch=2)
    assert doc["layout"]["dp"] == 2 and doc["layout"]["zero_stage"] == zero
    losses_close(result, single)
    assert model_line(result)["trainable_parameters"] == planned_trainable(job)
    assert_states_match_plan(result, doc)


# --- QLoRA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero", [2, 3])
def test_qlora_trains_on_a_4bit_base(runs: Runs, zero: int) -> None:
    job = fl.manifest(tiny_models.SPEC_ARCH["llama"], "qlora", "bf16", loraRank=8, loraTargets=TARGETS_ALL)
    result, doc, out = runs.run(f"qlora-z{zero}", model="llama", job=job, gpus=2, zero=zero, micro_batch=2)
    model = model_line(result)
    assert model["weights_4bit"] == 2 * 7  # every linear layer of the two decoder layers
    assert model["trainable_parameters"] == planned_trainable(job)
    losses = result.losses
    assert min(losses[s] for s in (STEPS - 1, STEPS)) < losses[1], losses
    assert_states_match_plan(result, doc)
    assert (out / "adapter_model.safetensors").is_file()


# --- freeze and full ----------------------------------------------------------------------------


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file  # noqa: PLC0415

    return load_file(str(path))


def test_freeze_leaves_the_frozen_layers_bitwise_unchanged(runs: Runs, models: dict[str, Path]) -> None:
    job = fl.manifest(tiny_models.SPEC_ARCH["llama"], "freeze", trainableFraction=0.5)
    result, doc, out = runs.run("freeze-z3", model="llama", job=job, gpus=2, zero=3, micro_batch=2)
    assert doc["training"]["first_trainable_layer"] == 1
    assert model_line(result)["trainable_parameters"] == planned_trainable(job)
    assert_states_match_plan(result, doc)
    before = _tensors(models["llama"] / "model.safetensors")
    after = _tensors(out / "model.safetensors")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        same = bool((tensor == after[name]).all())
        if name.startswith("model.layers.1.") and name.endswith(".weight") and "norm" not in name:
            assert not same, f"{name} is in a trained layer but did not change"
        elif not name.startswith("model.layers.1."):
            assert same, f"{name} is frozen but changed"
    assert (out / "tokenizer.json").is_file()  # the output is a complete model directory


def test_full_zero3_trains_every_weight(runs: Runs) -> None:
    job = fl.manifest(tiny_models.SPEC_ARCH["llama"], "full")
    result, doc, _ = runs.run("full-z3", model="llama", job=job, gpus=2, zero=3, micro_batch=2)
    assert model_line(result)["trainable_parameters"] == model_line(result)["parameters"]
    assert result.losses[STEPS] < result.losses[1]
    assert_states_match_plan(result, doc)


# --- Ulysses sequence parallelism on packed records ---------------------------------------------


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sp2_on_packed_chat_records_gives_the_single_process_losses(runs: Runs, method: str) -> None:
    # Packed rows carry per-sample position ids: each SP rank gets its slice of them, so the
    # per-sample attention masking survives the split.
    job = lora_job() if method == "lora" else fl.manifest(tiny_models.SPEC_ARCH["llama"], "full")
    single, _, _ = runs.run(f"{method}-single-z1", model="llama", job=job, gpus=1, zero=1, micro_batch=2)
    result, doc, _ = runs.run(f"{method}-sp2-z1", model="llama", job=job, gpus=1, zero=1, micro_batch=2, sp=2)
    assert doc["layout"]["sp"] == 2 and [r["rank"] for r in result.ranks] == [0, 1]
    losses_close(result, single)
    assert result.losses[STEPS] < result.losses[1]


# --- outputs load in a fresh process -------------------------------------------------------------

_RELOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
from shardwise_trainer.data import TokenSource
from shardwise_trainer.model import TPContext, lm_loss

base, out, kind, micro, remote, data = sys.argv[1:7]
micro, remote = int(micro), remote == "1"
if kind == "adapter":
    from peft import PeftModel
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=remote)
    model = PeftModel.from_pretrained(model, out)
else:
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=remote)
model.eval()
cfg = model.config
source = TokenSource(vocab_size=256, sequence_length=32, seed=1234, path=data)
ids, labels = source.micro_batch(step=0, micro=0, dp_rank=0, dp=1, micro_batch=micro, global_batch=micro)
with torch.no_grad():
    logits = model(input_ids=ids).logits
print(json.dumps({"loss": float(lm_loss(logits, labels, TPContext(1, 0, None)))}))
"""


def _reload_loss(models: dict[str, Path], model: str, out: Path, kind: str, *, remote: bool = False) -> float:
    base, data = models[model], models["data"]
    flag = "1" if remote else "0"
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(base), str(out), kind, "2", flag, str(data)],
        capture_output=True,
        text=True,
        env=trainer_env({"HF_HUB_OFFLINE": "1"}),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["loss"])


@pytest.mark.parametrize(
    ("name", "kind"), [("lora-dp2-z3", "adapter"), ("freeze-z3", "model"), ("full-z3", "model")]
)
def test_the_output_loads_in_a_fresh_process_with_the_trained_model(
    runs: Runs, models: dict[str, Path], name: str, kind: str
) -> None:
    if name not in runs.results:
        pytest.skip(f"{name} did not run in this session (its own test selects it)")
    result, _, out = runs.results[name]
    output = result.events["output"][0]
    assert output["path"] == str(out)
    loss = _reload_loss(models, "llama", out, kind)
    assert abs(loss - output["probe_loss"]) <= 1e-4 * max(1.0, loss), (loss, output)


# --- other families ------------------------------------------------------------------------------


def test_chatglm_remote_code_lora_adapts_the_fused_matrices(runs: Runs, models: dict[str, Path]) -> None:
    job = lora_job("chatglm")
    result, doc, out = runs.run(
        "chatglm-lora",
        model="chatglm",
        job=job,
        gpus=2,
        zero=2,
        micro_batch=2,
        extra=("--trust-remote-code",),
    )
    h, kv, f, r = 64, 32, 128, 4
    fused = r * (h + h + 2 * kv) + r * (h + h) + r * (h + 2 * f) + r * (f + h)  # qkv, dense, h_to_4h, 4h_to_h
    assert model_line(result)["trainable_parameters"] == planned_trainable(job) == 2 * fused
    assert result.losses[STEPS] < result.losses[1]
    assert_states_match_plan(result, doc)
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    loss = _reload_loss(models, "chatglm", out, "adapter", remote=True)
    assert abs(loss - result.events["output"][0]["probe_loss"]) <= 1e-4 * max(1.0, loss)


def test_qwen2_vl_lora_zero3_trains_text_only(runs: Runs) -> None:
    arch = {**tiny_models.SPEC_ARCH["llama"], "family": "qwen2", "qkvBias": True, "extraParameters": 71008}
    job = fl.manifest(arch, "lora", loraRank=4, loraTargets=TARGETS_ALL)
    result, doc, out = runs.run("qwen2-vl-lora", model="qwen2-vl", job=job, gpus=2, zero=3, micro_batch=2)
    model = model_line(result)
    assert model["parameters"] == 178080  # language model + vision tower, as the planner counts it
    assert model["trainable_parameters"] == planned_trainable(job)
    assert_states_match_plan(result, doc)
    config = json.loads((out / "adapter_config.json").read_text())
    assert "visual" in str(config.get("exclude_modules"))


# --- offload --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("zero", "offload"), [(2, "optimizer"), (3, "optimizer"), (3, "all")])
def test_offload_steps_deepspeed_cpu_adam(runs: Runs, zero: int, offload: str) -> None:
    job = lora_job()
    reference, _, _ = runs.run(f"lora-dp2-z{zero}", model="llama", job=job, gpus=2, zero=zero, micro_batch=2)
    result, doc, _ = runs.run(
        f"lora-z{zero}-{offload}", model="llama", job=job, gpus=2, zero=zero, micro_batch=2, offload=offload
    )
    assert doc["layout"]["offload"] == offload
    assert {r["optimizer"] for r in result.ranks} == {"DeepSpeedCPUAdam"}
    assert {r["optimizer"] for r in reference.ranks} != {"DeepSpeedCPUAdam"}
    losses_close(result, reference)


# --- bad input: exit 2, one line, the reason in the termination message ---------------------------


def _bad_run(layout: Path, model_dir: Path, tmp_path: Path, *extra: str) -> tuple[int, str, str]:
    return run_refused(layout, tmp_path, "--hf-model", str(model_dir), "--synthetic-data", *extra)


@pytest.fixture(scope="module")
def lora_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "lora.json"
    fl.plan_layout(path, lora_job(), gpus=1, zero=0, micro_batch=2)
    return path


def test_missing_weight_files_exit_2_invalid_model(
    models: dict[str, Path], lora_layout: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "model"
    broken.mkdir()
    for item in models["llama"].iterdir():
        if item.suffix != ".safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    code, line, message = _bad_run(lora_layout, broken, tmp_path)
    assert code == 2 and "no weight files" in line
    assert "shardwise.dev/exit-code=2" in message and "shardwise.dev/reason=InvalidModel" in message


def test_remote_code_needs_the_opt_in(models: dict[str, Path], tmp_path: Path) -> None:
    layout = tmp_path / "glm.json"
    fl.plan_layout(layout, lora_job("chatglm"), gpus=1, zero=0, micro_batch=2)
    code, line, message = _bad_run(layout, models["chatglm"], tmp_path)
    assert code == 2 and "--trust-remote-code" in line and "modeling_chatglm.py" in line
    assert "shardwise.dev/reason=InvalidModel" in message


def test_a_lora_target_the_family_cannot_adapt_exits_2(models: dict[str, Path], tmp_path: Path) -> None:
    layout = tmp_path / "glm-q.json"
    fl.plan_layout(layout, lora_job("chatglm"), gpus=1, zero=0, micro_batch=2)
    doc = json.loads(layout.read_text())
    doc["training"]["lora_targets"] = ["q", "o"]  # q alone is a third of query_key_value
    layout.write_text(json.dumps(doc))
    code, line, message = _bad_run(layout, models["chatglm"], tmp_path, "--trust-remote-code")
    assert code == 2 and "name q, k, v together" in line
    assert "shardwise.dev/reason=InvalidModel" in message


def test_a_model_that_disagrees_with_the_plan_exits_2(
    models: dict[str, Path], lora_layout: Path, tmp_path: Path
) -> None:
    doc = json.loads(lora_layout.read_text())
    doc["model"]["architecture"]["layers"] = 3
    doc["ranks"]["stage_layers"] = [[0, 3]]
    layout = tmp_path / "three-layers.json"
    layout.write_text(json.dumps(doc))
    code, line, message = _bad_run(layout, models["llama"], tmp_path)
    assert code == 2 and "model.architecture.layers=3" in line and "num_hidden_layers=2" in line
    assert "shardwise.dev/reason=InvalidModel" in message


def test_lora_without_a_pretrained_model_exits_2_unsupported(lora_layout: Path, tmp_path: Path) -> None:
    message = tmp_path / "termination-log"
    proc = subprocess.run(
        [sys.executable, "-m", "shardwise_trainer", "--layout", str(lora_layout), "--synthetic-data"],
        capture_output=True,
        text=True,
        env=trainer_env({"SHARDWISE_TERMINATION_LOG": str(message)}),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2 and "needs a pretrained model" in proc.stderr
    assert "shardwise.dev/reason=UnsupportedByRuntime" in message.read_text()
