"""LoRA fine-tunes of a local pretrained model through the operator: 2 nodes x 2 processes.

The tiny pretrained Llama (tests/tiny_models.py: random weights from a config, saved with
``save_pretrained`` beside an offline-trained tokenizer given a ChatML chat template), the chat
``messages`` records (JSON lines) and the output directory sit in hostPath volumes of the pod
template, and reach the trainer through the job's own fields: ``spec.model.path``, ``spec.data``
and ``spec.output`` with ``volume: {name: ...}`` — the template's command carries no
``--hf-model`` / ``--data`` / ``--output-dir``. The job must reach Succeeded with the adapter
written where status.outputPath says, the loss falling and the validation loss reported. A bad
record fails the job with reason InvalidDataset, a model directory without weights with
InvalidModel (the trainer's termination message), each with an Event and without restarts.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from tests import tiny_models
from tests.e2e.jobs_e2e import json_lines
from tests.jobs import Kubectl, condition_is, wait_for

pytestmark = pytest.mark.e2e

STEPS = 12


def lora_job(
    name: str, namespace: str, node_selector: dict[str, str], *, models: Path, data: Path, output: Path
) -> dict[str, Any]:
    """The job: ``models`` holds the model directory ``tiny``, ``data`` the file ``chat.jsonl``."""
    return {
        "apiVersion": "shardwise.dev/v1alpha1",
        "kind": "ParallelTrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {
                "architecture": tiny_models.SPEC_ARCH["llama"],
                "path": "/tiny",
                "volume": {"name": "models"},
            },
            "data": {
                "path": "/chat.jsonl",
                "volume": {"name": "data"},
                "format": "messages",
                "validation": {"fraction": 0.1},
                "evalEvery": STEPS // 2,
            },
            "output": {"path": "/adapter", "volume": {"name": "output"}},
            "training": {
                "method": "lora",
                "precision": "fp32",
                "sequenceLength": 64,
                "globalBatchSize": 8,
                "learningRate": 0.003,
                "loraRank": 4,
                "loraTargets": ["q", "k", "v", "o", "gate", "up", "down"],
                "activationCheckpointing": "none",
                "offload": "none",
            },
            "parallelism": {"zeroStage": 2},
            "resources": {"nodes": 2, "gpusPerNode": 2, "gpuMemory": "2GiB", "nodeSelector": node_selector},
            "runPolicy": {"maxRestarts": 0},
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "shardwise-trainer:dev",
                            "command": ["python", "-m", "shardwise_trainer"],
                            "args": ["--steps", str(STEPS)],
                            "env": [{"name": "DS_ACCELERATOR", "value": "cpu"}],
                        }
                    ],
                    "volumes": [
                        {"name": "models", "hostPath": {"path": str(models), "type": "Directory"}},
                        {"name": "data", "hostPath": {"path": str(data), "type": "Directory"}},
                        {"name": "output", "hostPath": {"path": str(output), "type": "DirectoryOrCreate"}},
                    ],
                }
            },
        },
    }


def _dirs(tmp_path: Path, records: list[dict[str, Any]]) -> tuple[Path, Path, Path]:
    models, data, output = tmp_path / "models", tmp_path / "data", tmp_path / "output"
    for directory in (models, data, output):
        directory.mkdir()
    tiny_models.with_chat_template(tiny_models.llama(models / "tiny"))
    tiny_models.write_jsonl(data / "chat.jsonl", records)
    return models, data, output


def _finished(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        f"{name} finished",
        lambda: (j := kubectl.job(namespace, name))["status"].get("phase") in ("Succeeded", "Failed") and j,
        timeout=420,
        interval=1,
    )


def test_a_lora_job_on_chat_records_from_volumes_succeeds_and_writes_the_adapter(
    cluster: Any, node_runner: Any, shardwise_operator: Any, tmp_path: Path
) -> None:
    kubectl = Kubectl(cluster)
    namespace = f"e2e-lora-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)
    models, data, output = _dirs(tmp_path, tiny_models.chat_records(100))
    kubectl.apply(
        lora_job("lora", namespace, node_runner.node_selector, models=models, data=data, output=output)
    )

    job = _finished(kubectl, namespace, "lora")
    logs = {rank: node_runner.pod_log(namespace, f"lora-node-{rank}") for rank in (0, 1)}
    assert condition_is(job, "Succeeded", "True", "AllPodsSucceeded"), (job["status"], logs[0][-4000:])
    layout = json.loads(
        kubectl.json("get", "configmap", "lora-layout", "-n", namespace)["data"]["layout.json"]
    )
    assert (layout["layout"]["tp"], layout["layout"]["pp"], layout["layout"]["dp"]) == (1, 1, 4)
    pod = kubectl.json("get", "pod", "lora-node-1", "-n", namespace)
    [trainer] = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["SHARDWISE_HF_MODEL"] == "/shardwise/model/tiny"
    assert env["SHARDWISE_DATA"] == "/shardwise/data/chat.jsonl"
    assert env["SHARDWISE_OUTPUT_DIR"] == "/shardwise/output/adapter"
    assert not any(a.startswith("--hf-model") or a.startswith("--data") for a in trainer["command"])

    records = [r for log in logs.values() for r in json_lines(log)]
    [data_line] = [r for r in records if r.get("event") == "data"]
    assert data_line["format"] == "messages" and data_line["template"] == "model", data_line
    assert data_line["train"]["samples"] + data_line["validation"]["samples"] == 100
    steps = [r for r in records if r.get("event") == "step"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first, (first, last)
    evals = [r for r in records if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [STEPS // 2, STEPS], evals
    assert all(e["loss"] > 0 for e in evals) and evals[-1]["loss"] < evals[0]["loss"], evals
    [model_line] = [r for r in records if r.get("event") == "model"]
    assert model_line["source"] == "pretrained" and model_line["trainable_parameters"] == 8192
    [written] = [r for r in records if r.get("event") == "output"]
    assert job["status"]["outputPath"] == written["path"] == str(output / "adapter")
    adapter = Path(job["status"]["outputPath"])
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4


def test_a_record_without_its_fields_fails_the_job_with_invalid_dataset(
    cluster: Any, node_runner: Any, shardwise_operator: Any, tmp_path: Path
) -> None:
    kubectl = Kubectl(cluster)
    namespace = f"e2e-baddata-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)
    records = tiny_models.chat_records(20)
    records[6] = {"messages": [{"role": "user"}]}  # line 7: a turn without its content
    models, data, output = _dirs(tmp_path, records)
    kubectl.apply(
        lora_job("baddata", namespace, node_runner.node_selector, models=models, data=data, output=output)
    )

    job = _finished(kubectl, namespace, "baddata")
    assert condition_is(job, "Failed", "True", "InvalidDataset"), job["status"]
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert "chat.jsonl:7" in failed["message"] and "content" in failed["message"], failed
    assert int(job["status"].get("restarts") or 0) == 0
    events = kubectl.events(namespace, "baddata")
    assert any(e["reason"] == "InvalidDataset" and e["type"] == "Warning" for e in events), events
    assert not any(output.iterdir()), list(output.iterdir())
    assert "outputPath" not in job["status"]


def test_a_model_without_weights_fails_the_job_with_invalid_model(
    cluster: Any, node_runner: Any, shardwise_operator: Any, tmp_path: Path
) -> None:
    kubectl = Kubectl(cluster)
    namespace = f"e2e-bad-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)
    models, data, output = _dirs(tmp_path, tiny_models.chat_records(20))
    (models / "tiny" / "model.safetensors").unlink()
    kubectl.apply(
        lora_job("noweights", namespace, node_runner.node_selector, models=models, data=data, output=output)
    )

    job = _finished(kubectl, namespace, "noweights")
    assert condition_is(job, "Failed", "True", "InvalidModel"), job["status"]
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert "no weight files" in failed["message"], failed
    assert int(job["status"].get("restarts") or 0) == 0
    reasons = {e["reason"] for e in kubectl.events(namespace, "noweights")}
    assert "InvalidModel" in reasons, reasons
