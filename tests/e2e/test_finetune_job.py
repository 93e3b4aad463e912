"""A LoRA fine-tune of a local pretrained model through the operator: 2 nodes x 2 processes.

The tiny pretrained Llama (tests/tiny_models.py: random weights from a config, saved with
``save_pretrained`` beside an offline-trained tokenizer) sits in a directory the pod template
mounts as a hostPath volume; the trainer gets it as ``--hf-model``. The job must reach
Succeeded with the adapter written to the output volume and the loss falling. A model directory
without weights makes the job Failed with reason InvalidModel (the trainer's termination
message) and an Event, without restarts.
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


def lora_job(
    name: str, namespace: str, node_selector: dict[str, str], *, model: Path, output: Path, data: Path
) -> dict[str, Any]:
    return {
        "apiVersion": "shardwise.dev/v1alpha1",
        "kind": "ParallelTrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"architecture": tiny_models.SPEC_ARCH["llama"]},
            "training": {
                "method": "lora",
                "precision": "fp32",
                "sequenceLength": 32,
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
                            "command": ["python", "-m", "shardwise_trainer", "--data", "/data/tokens.bin"],
                            "args": [
                                "--steps",
                                "12",
                                "--hf-model",
                                "/models/tiny",
                                "--output-dir",
                                "/output/adapter",
                            ],
                            "env": [{"name": "DS_ACCELERATOR", "value": "cpu"}],
                            "volumeMounts": [
                                {"name": "models", "mountPath": "/models/tiny", "readOnly": True},
                                {"name": "output", "mountPath": "/output"},
                                {"name": "data", "mountPath": "/data", "readOnly": True},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "models", "hostPath": {"path": str(model), "type": "Directory"}},
                        {"name": "output", "hostPath": {"path": str(output), "type": "DirectoryOrCreate"}},
                        {"name": "data", "hostPath": {"path": str(data.parent), "type": "Directory"}},
                    ],
                }
            },
        },
    }


def _finished(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        f"{name} finished",
        lambda: (j := kubectl.job(namespace, name))["status"].get("phase") in ("Succeeded", "Failed") and j,
        timeout=420,
        interval=1,
    )


def test_a_lora_job_on_a_pretrained_model_succeeds_and_writes_the_adapter(
    cluster: Any, node_runner: Any, shardwise_operator: Any, tmp_path: Path
) -> None:
    kubectl = Kubectl(cluster)
    namespace = f"e2e-lora-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)
    model = tiny_models.llama(tmp_path / "model")
    output = tmp_path / "output"
    output.mkdir()
    (tmp_path / "data").mkdir()
    data = tiny_models.skewed_tokens(tmp_path / "data" / "tokens.bin")
    kubectl.apply(
        lora_job("lora", namespace, node_runner.node_selector, model=model, output=output, data=data)
    )

    job = _finished(kubectl, namespace, "lora")
    logs = {rank: node_runner.pod_log(namespace, f"lora-node-{rank}") for rank in (0, 1)}
    assert condition_is(job, "Succeeded", "True", "AllPodsSucceeded"), (job["status"], logs[0][-4000:])
    layout = json.loads(
        kubectl.json("get", "configmap", "lora-layout", "-n", namespace)["data"]["layout.json"]
    )
    assert (layout["layout"]["tp"], layout["layout"]["pp"], layout["layout"]["dp"]) == (1, 1, 4)

    records = [r for log in logs.values() for r in json_lines(log)]
    steps = [r for r in records if r.get("event") == "step"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first, (first, last)
    [model_line] = [r for r in records if r.get("event") == "model"]
    assert model_line["source"] == "pretrained" and model_line["trainable_parameters"] == 8192
    [written] = [r for r in records if r.get("event") == "output"]
    assert written["path"] == str(output / "adapter")
    assert job["status"]["outputPath"] == str(output / "adapter")
    adapter = output / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    ranks = {r["rank"]: r for r in records if r.get("event") == "rank"}
    planned = layout["predicted"]["per_stage"][0]["model_state_bytes"]
    for record in ranks.values():
        assert abs(record["model_state_bytes"] - planned) <= 0.05 * planned, (record, planned)


def test_a_model_without_weights_fails_the_job_with_invalid_model(
    cluster: Any, node_runner: Any, shardwise_operator: Any, tmp_path: Path
) -> None:
    kubectl = Kubectl(cluster)
    namespace = f"e2e-bad-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)
    model = tmp_path / "no-weights"
    tiny_models.llama(model)
    (model / "model.safetensors").unlink()
    (tmp_path / "data").mkdir()
    data = tiny_models.skewed_tokens(tmp_path / "data" / "tokens.bin")
    job = lora_job(
        "noweights", namespace, node_runner.node_selector, model=model, output=tmp_path / "out", data=data
    )
    kubectl.apply(job)

    job = _finished(kubectl, namespace, "noweights")
    assert condition_is(job, "Failed", "True", "InvalidModel"), job["status"]
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert "no weight files" in failed["message"], failed
    assert int(job["status"].get("restarts") or 0) == 0
    reasons = {e["reason"] for e in kubectl.events(namespace, "noweights")}
    assert "InvalidModel" in reasons, reasons
