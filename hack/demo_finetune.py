"""`hack/demo --finetune`: LoRA on a tiny pretrained model and a JSON-lines chat file, via the operator.

Builds, offline, a tiny Llama-style model directory (random weights, a byte-level BPE tokenizer
trained on a few sentences, a ChatML chat template: tests/tiny_models.py) and ~100 chat
``messages`` records, prints ``shardwise plan`` of examples/tiny-cpu-finetune.yaml, applies it with
its three hostPath volumes pointed at those directories (spec.model.path / data / output), follows
the job, and prints the losses, the validation loss and where the adapter went.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from demo_stack import ROOT, RUNNER_NAME, Stack, kubectl, local_stack, say
from tests import tiny_models
from tests.e2e.jobs_e2e import json_lines

EXAMPLE = ROOT / "examples" / "tiny-cpu-finetune.yaml"
NAME = "tiny-cpu-finetune"


def build_inputs(state: Path) -> dict[str, Path]:
    """The model directory, the records and an empty output directory (volume name -> host dir)."""
    dirs = {name: state / name for name in ("models", "data", "output")}
    for directory in dirs.values():
        directory.mkdir(parents=True)
    doc = yaml.safe_load(EXAMPLE.read_text())["spec"]
    model = tiny_models.llama(dirs["models"] / doc["model"]["path"].lstrip("/"))
    tiny_models.with_chat_template(model)
    records = dirs["data"] / doc["data"]["path"].lstrip("/")
    tiny_models.write_jsonl(records, tiny_models.chat_records(100))
    say(f"built offline: model {model} (random weights, tokenizer + chat template), {records} (100 records)")
    print(f"   first record: {records.read_text().splitlines()[0]}")
    return dirs


def job_manifest(dirs: dict[str, Path], steps: int) -> dict[str, Any]:
    """The example with its hostPath volumes on ``dirs``, on the node runner's nodes."""
    job = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    job["metadata"] = {"name": NAME, "namespace": "default"}
    spec = job["spec"]
    spec["resources"]["nodeSelector"] = {"shardwise.dev/local-runner-name": RUNNER_NAME}
    spec["runPolicy"] = {"maxRestarts": 0}
    for volume in spec["template"]["spec"]["volumes"]:
        volume["hostPath"]["path"] = str(dirs[volume["name"]])
    spec["template"]["spec"]["containers"][0]["args"] = ["--steps", str(steps)]
    return dict(job)


def follow(stack: Stack, timeout: float = 600) -> dict[str, Any]:
    phase, status = "", {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads(kubectl(stack.cluster, "get", "ptj", NAME, "-o", "json")).get("status") or {}
        if status.get("phase") != phase:
            phase = str(status.get("phase"))
            print(f"   phase {phase}: {status.get('message', '')}", flush=True)
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(1)
    return dict(status)


def finetune(*, steps: int, keep: bool) -> int:
    """Run the fine-tuning demo; 0 when the job succeeded, the loss fell and the adapter exists."""
    say("plan (offline): shardwise plan examples/tiny-cpu-finetune.yaml")
    subprocess.run([sys.executable, "-m", "shardwise.cli", "plan", str(EXAMPLE)], check=True)
    state = Path(tempfile.mkdtemp(prefix="shardwise-demo-finetune-"))
    dirs = build_inputs(state)
    with local_stack(state) as stack:
        job = job_manifest(dirs, steps)
        kubectl(stack.cluster, "apply", "-f", "-", stdin=yaml.safe_dump(job))
        say("applied examples/tiny-cpu-finetune.yaml (model, data and output from hostPath volumes)")
        status = follow(stack)
        print(kubectl(stack.cluster, "get", "ptj", "-o", "wide"))
        logs = {rank: stack.pod_log("default", f"{NAME}-node-{rank}") for rank in (0, 1)}
        records = [r for log in logs.values() for r in json_lines(log)]
        for line in (r for r in records if r.get("event") == "data"):
            train, val = line["train"], line["validation"]
            say(f"data: {line['format']} records, template from the {line['template']}")
            print(
                f"   train {train['samples']} samples -> {train['rows']} packed rows,"
                f" {train['trained']} trained tokens; validation {val['samples']} samples;"
                f" tokenized {line['tokenize']['records']} records in {line['tokenize']['seconds']:.2f}s"
            )
        steps_seen = [r for r in records if r.get("event") == "step"]
        evals = [r for r in records if r.get("event") == "eval"]
        if steps_seen:
            say("training (rank 0, one JSON line per step)")
            for r in steps_seen[:: max(1, len(steps_seen) // 10)] + steps_seen[-1:]:
                print(f"   step {r['step']:4d}  loss {r['loss']:.4f}  tokens/s {r['tokens_per_s']:.0f}")
        if evals:
            say("validation loss")
            for r in evals:
                print(f"   step {r['step']:4d}  validation loss {r['loss']:.4f}  ({r['rows']} rows)")
        output = status.get("outputPath")
        adapter = Path(output) if output else None
        if adapter is not None:
            say(f"adapter written to {adapter} (status.outputPath)")
            for item in sorted(adapter.iterdir()):
                print(f"   {item.name:32s} {item.stat().st_size:>10,d} B")
        if keep:
            say("--keep: leaving everything running; export KUBECONFIG=" + str(stack.cluster.kubeconfig))
            input("press Enter to stop ")
        ok = (
            status.get("phase") == "Succeeded"
            and bool(steps_seen)
            and steps_seen[-1]["loss"] < steps_seen[0]["loss"]
            and bool(evals)
            and adapter is not None
            and (adapter / "adapter_model.safetensors").is_file()
        )
        say("demo " + ("succeeded: LoRA fine-tuned through the operator, adapter saved" if ok else "FAILED"))
        if not ok:
            print(stack.operator.log()[-5000:])
            for rank, log in logs.items():
                print(f"--- pod {NAME}-node-{rank} log tail\n{log[-3000:]}")
        return 0 if ok else 1
