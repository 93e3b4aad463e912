"""`shardwise plan` and `shardwise presets`: exit codes, one-line errors, JSON contract, examples."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardwise.cli import main
from shardwise.jobspec import request_from_spec, spec_from_manifest
from shardwise.planner import plan
from shardwise.resources.layout_file import layout_document_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    out = io.StringIO()
    code = main(args, out=out)
    return code, out.getvalue(), capsys.readouterr().err


def _manifest(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


HEAD = "apiVersion: shardwise.dev/v1alpha1\nkind: ParallelTrainingJob\nspec:\n"
BASE = ["plan", "--model", "llama-2-7b", "--gpus", "8", "--gpu", "H100"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "--model", "llama-9", "--gpus", "8", "--gpu", "H100"], "unknown model preset 'llama-9'"),
        ([*BASE, "--tp", "3"], "TP=3 does not divide the attention heads"),
        ([*BASE, "--pp", "3"], "8 GPUs are not divisible by TP x PP = 1 x 3"),
        ([*BASE, "--tp", "2", "--pp", "3"], "8 GPUs are not divisible by TP x PP = 2 x 3"),
        ([*BASE, "--seq", "0"], "argument --seq: must be positive, got '0'"),
        ([*BASE, "--global-batch", "-8"], "argument --global-batch: must be positive, got '-8'"),
        (
            ["plan", "--model", "llama-2-7b", "--gpus", "-1", "--gpu", "H100"],
            "argument --gpus: must be positive",
        ),
        ([*BASE, "--gpu-memory", "24XB"], "argument --gpu-memory: unknown unit 'XB' in '24XB'"),
        ([*BASE, "--gpu-memory=-24GiB"], "argument --gpu-memory: must be positive, got '-24GiB'"),
        ([*BASE, "--gpu-memory", "lots"], "argument --gpu-memory: cannot parse size 'lots'"),
        ([*BASE, "--tp", "0"], "argument --tp: must be positive"),
        ([*BASE, "--zero", "5"], "argument --zero: invalid choice"),
        ([*BASE, "--method", "sft"], "argument --method: invalid choice: 'sft'"),
        (["plan", "--model", "llama-2-7b", "--gpus", "8", "--gpu", "NVIDIA-Z9"], "unknown GPU 'NVIDIA-Z9'"),
        (
            ["plan", "--model", "llama-2-7b", "--gpus", "12", "--gpu", "H100"],
            "12 GPUs do not fill nodes of 8",
        ),
        (["plan", "--gpus", "8", "--gpu", "H100"], "no model"),
        (["plan", "--model", "llama-2-7b", "--gpu", "H100"], "the number of GPUs is required"),
        ([*BASE, "--params", "7e9"], "give --model or --params, not both"),
        ([*BASE, "--gpus-per-node", "3"], "--gpus 8 is not a multiple of --gpus-per-node 3"),
        ([*BASE, "--gpus-per-node", "4", "--nodes", "3"], "--gpus 8 != --nodes 3 x --gpus-per-node 4"),
        ([*BASE, "--nodes", "3"], "--gpus 8 is not a multiple of --nodes 3"),
        ([*BASE, "--sequence-parallel", "yes"], "argument --sequence-parallel: invalid choice: 'yes'"),
        ([*BASE, "--expert", "2"], "needs a mixture-of-experts model"),
        (["plan", "--params", "0", "--gpus", "8", "--gpu", "H100"], "argument --params: must be positive"),
        (["plan", "/nonexistent/job.yaml"], "/nonexistent/job.yaml: cannot read"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_value(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(args, capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("shardwise: error: ")
    assert message in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("spec: [unclosed", "malformed manifest"),
        ("kind: Pod\napiVersion: v1\n", "kind: expected ParallelTrainingJob"),
        ("- a\n- b\n", "expected a ParallelTrainingJob mapping"),
        (
            "apiVersion: shardwise.dev/v1alpha1\nkind: ParallelTrainingJob\nspec:\n  model: {preset: gpt-9}\n"
            "  resources: {gpus: 8, gpuProduct: NVIDIA-H100-80GB-HBM3}\n",
            "unknown model preset 'gpt-9'",
        ),
        (
            HEAD
            + "  model: {preset: llama-2-7b}\n  training: {sequenceLength: -1}\n"
            + "  resources: {gpus: 8, gpuMemory: 80GiB}\n",
            "spec.training.sequenceLength",
        ),
        (
            HEAD + "  model: {preset: llama-2-7b}\n  resources: {gpus: 8, gpuMemory: 80 gigs}\n",
            "spec.resources.gpuMemory",
        ),
    ],
)
def test_malformed_manifest_exits_2(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["plan", _manifest(tmp_path, text)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert message in err


def test_json_contract_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([*BASE, "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    for key in (
        "feasible", "layout", "memory_per_gpu", "cpu_memory_per_node", "step_time_seconds", "alternatives",
        "diagnosis",
    ):  # fmt: skip
        assert key in data
    assert data["feasible"] is True and data["diagnosis"] is None
    assert set(data["layout"]) == {
        "tp", "pp", "dp", "zero_stage", "micro_batch", "grad_accum", "checkpointing", "sequence_parallel",
        "offload", "nodes", "gpus_per_node", "ep",
    }  # fmt: skip
    memory = data["memory_per_gpu"]
    for key in (
        "parameters",
        "gradients",
        "optimizer_states",
        "activations",
        "overhead",
        "total",
        "capacity",
    ):
        assert isinstance(memory[key], int)
    assert memory["total"] == sum(
        memory[k] for k in ("parameters", "gradients", "optimizer_states", "activations", "overhead")
    )
    assert memory["total"] <= memory["capacity"]
    assert all(
        {"layout", "memory_per_gpu_total", "step_time_seconds"} <= set(a) for a in data["alternatives"]
    )


def test_infeasible_exits_1_and_still_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        ["plan", "--model", "llama-2-7b", "--gpus", "1", "--gpu", "A100-80GB", "--offload", "none", "--json"],
        capsys,
    )
    assert code == 1
    data = json.loads(out)
    assert data["feasible"] is False
    assert data["diagnosis"]["shortfall_bytes_per_gpu"] > 0
    assert data["diagnosis"]["ways_out"]


def test_params_only_json_reports_activations_null(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plan", "--params", "7B", "--gpus", "8", "--gpu", "H100", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["memory_per_gpu"]["activations"] is None


def test_human_output_has_the_memory_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        ["plan", "--model", "llama-2-70b", "--nodes", "2", "--gpus-per-node", "8", "--gpu", "H100"], capsys
    )
    assert code == 0
    words = ("parameters", "gradients", "optimizer states", "activations", "overhead", "total", "capacity")
    for word in (*words, "headroom", "next best:", "rejected"):
        assert word in out


def test_flags_override_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _manifest(tmp_path, (EXAMPLES / "gpt3-175b-64xa100.yaml").read_text())
    code, out, _ = run(["plan", job, "--tp", "8", "--pp", "8", "--json"], capsys)
    assert code == 0
    layout = json.loads(out)["layout"]
    assert (layout["tp"], layout["pp"], layout["nodes"], layout["gpus_per_node"]) == (8, 8, 8, 8)


def test_model_from_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 4096,
                "num_attention_heads": 32,
                "num_hidden_layers": 32,
                "intermediate_size": 11008,
                "vocab_size": 32000,
                "max_position_embeddings": 4096,
            }
        )
    )
    code, out, _ = run(["plan", "--model", str(config), "--gpus", "8", "--gpu", "H100", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["model"] == {"name": "config", "parameters": 6_738_415_616}
    config.write_text("{not json")
    code, _, err = run(["plan", "--model", str(config), "--gpus", "8", "--gpu", "H100"], capsys)
    assert code == 2 and "not valid JSON" in err


def test_manifest_out_turns_a_config_json_into_a_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "ChatGLM3-6B"
    model_dir.mkdir()
    config = model_dir / "config.json"
    config.write_text(
        json.dumps(
            {
                "model_type": "chatglm",
                "num_layers": 28,
                "hidden_size": 4096,
                "num_attention_heads": 32,
                "multi_query_attention": True,
                "multi_query_group_num": 2,
                "ffn_hidden_size": 13696,
                "padded_vocab_size": 65024,
                "seq_length": 8192,
                "add_qkv_bias": True,
            }
        )
    )
    job = tmp_path / "job.yaml"
    flags = ["--method", "lora", "--gpus", "8", "--gpu", "RTX-4090", "--seq", "2048", "--json"]
    code, direct, _ = run(["plan", "--model", str(config), *flags, "--manifest-out", str(job)], capsys)
    assert code == 0
    doc = yaml.safe_load(job.read_text())
    assert doc["kind"] == "ParallelTrainingJob" and doc["metadata"]["name"] == "chatglm3-6b"
    arch = doc["spec"]["model"]["architecture"]
    assert (arch["family"], arch["layers"], arch["kvHeads"], arch["qkvBias"]) == ("chatglm", 28, 2, True)
    assert doc["spec"]["training"]["method"] == "lora"
    # The manifest plans exactly as the config.json did.
    code, again, _ = run(["plan", str(job), "--json"], capsys)
    assert code == 0
    assert json.loads(again)["layout"] == json.loads(direct)["layout"]
    assert json.loads(again)["model"]["parameters"] == json.loads(direct)["model"]["parameters"]


def test_layout_out_writes_the_contract_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "layout.json"
    example = EXAMPLES / "tiny-cpu.yaml"
    code, _, _ = run(["plan", str(example), "--layout-out", str(out_file)], capsys)
    assert code == 0
    written = json.loads(out_file.read_text())
    expected = layout_document_for(
        plan(request_from_spec(spec_from_manifest(yaml.safe_load(example.read_text()))))
    )
    assert written == json.loads(json.dumps(expected))
    assert written["layout"]["nodes"] == 2 and written["layout"]["gpus_per_node"] == 2
    assert written["deepspeed"]["train_batch_size"] == 8


EXPECTED_EXIT = {
    "qwen2-vl-72b-full-8x4090.yaml": 1,
    "qwen2-vl-72b-lora-8x4090.yaml": 0,
    "qwen2-vl-72b-qlora-8x4090.yaml": 0,
    "chatglm3-6b-lora-8k-zero2.yaml": 0,
    "chatglm3-6b-lora-8k-zero3.yaml": 0,
    "llama-2-7b-full-1x80gb.yaml": 1,
    "llama-2-7b-full-1x80gb-offload.yaml": 0,
    "qwen2-72b-inference-8gpu.yaml": 1,  # refused: the trainer runs no inference yet
    "gpt3-175b-64xa100.yaml": 0,
    "tiny-cpu.yaml": 0,
    "tiny-cpu-finetune.yaml": 0,
}


def test_every_example_is_listed() -> None:
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == set(EXPECTED_EXIT)


@pytest.mark.parametrize(("name", "exit_code"), sorted(EXPECTED_EXIT.items()))
def test_examples_plan_as_documented(name: str, exit_code: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plan", str(EXAMPLES / name), "--json"], capsys)
    assert code == exit_code
    data: dict[str, Any] = json.loads(out)
    assert data["feasible"] is (exit_code == 0)
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert containers[0]["name"] == "trainer" and "shardwise_trainer" in containers[0]["command"]
    refused = [r for r in data["rejected"] if r["reason"].startswith("the trainer cannot run")]
    if exit_code == 1 and data["layouts_considered"] == 0:
        assert refused, "an example refused outright must say what the trainer does not run"
    elif exit_code == 1:
        assert data["diagnosis"]["ways_out"], "an infeasible example must come with ways out"


def test_qwen2_vl_full_finetune_diagnosis_has_the_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plan", str(EXAMPLES / "qwen2-vl-72b-full-8x4090.yaml")], capsys)
    assert code == 1
    assert "INFEASIBLE" in out and "GiB" in out
    for way in ("LORA", "QLORA", "GPUs", "host memory per node"):
        assert way in out


def test_presets_lists_models_and_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["presets"], capsys)
    assert code == 0
    for name in ("llama-2-70b", "qwen2-vl-72b", "chatglm3-6b", "gpt3-175b", "gpt-1t", "RTX-4090", "H200"):
        assert name in out


def test_installed_console_script() -> None:
    exe = shutil.which("shardwise")
    if exe is None:
        pytest.skip("the shardwise console script is not installed")
    proc = subprocess.run(
        [exe, "plan", str(EXAMPLES / "tiny-cpu.yaml"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["feasible"] is True
    bad_args = [exe, "plan", "--model", "nope", "--gpus", "1", "--gpu", "H100"]
    bad = subprocess.run(bad_args, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "unknown model preset 'nope'" in bad.stderr


def test_layout_out_is_accepted_by_the_trainer_contract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    contract: Any = pytest.importorskip("shardwise_trainer.contract")
    out_file = tmp_path / "layout.json"
    code, _, _ = run(
        ["plan", str(EXAMPLES / "gpt3-175b-64xa100.yaml"), "--layout-out", str(out_file)], capsys
    )
    assert code == 0
    parsed = contract.parse_layout(json.loads(out_file.read_text()))
    assert parsed.tp * parsed.pp * parsed.dp == 64


def test_gpus_with_gpus_per_node_gives_the_node_shape(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plan", "--model", "llama-2-7b", "--gpus", "16", "--gpus-per-node", "4",
                        "--gpu", "H100", "--json"], capsys)  # fmt: skip
    assert code == 0
    layout = json.loads(out)["layout"]
    assert (layout["nodes"], layout["gpus_per_node"]) == (4, 4)


@pytest.mark.parametrize(("flag", "tp_allowed"), [("on", False), ("off", True), ("auto", True)])
def test_sequence_parallel_on_off_auto(
    flag: str, tp_allowed: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run([*BASE, "--sequence-parallel", flag, "--tp", "1", "--json"], capsys)
    if tp_allowed:
        assert code == 0 and json.loads(out)["layout"]["sequence_parallel"] is False
    else:  # pinned on with TP 1: the planner's own one-line error
        assert code == 2 and "sequence parallelism needs TP > 1" in err
