"""LoRA throughput: shardwise_trainer against a plain transformers Trainer + DeepSpeed + peft run.

Same tiny pretrained Llama (random weights, saved with ``save_pretrained``), same LoRA (rank 8 on
q, k, v, o, gate, up, down), same layout (DP2, ZeRO-2, fp32, micro-batch 2, no accumulation),
same DeepSpeed optimizer settings and the same token file, under ``torchrun --nproc-per-node 2``
on CPU. The reference is the textbook peft + ``transformers.Trainer(deepspeed=...)`` script and
nothing else. Throughput: tokens of the steps after a warm-up over their wall time, stamped by
rank 0 on both sides. Runs alternate (trainer, reference), ``--runs`` each; medians reported.

    python benchmarks/lora_vs_hf_trainer.py [--runs 3] [--steps 30]

Writes benchmarks/results/lora_vs_hf_trainer.json and .md.
"""

# ruff: noqa: PLC0415
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

SEQ, GLOBAL_BATCH, MICRO, RANK, WARMUP = 64, 4, 2, 8, 5
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

REFERENCE = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    model_dir, data, ds_config, steps, seq, micro, rank, out = sys.argv[1:9]
    steps, seq, micro, rank = int(steps), int(seq), int(micro), int(rank)
    tokens = np.memmap(data, dtype=np.uint16, mode="r")

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return 10**6
        def __getitem__(self, j):
            start = (j * seq) % (len(tokens) - seq - 1)
            ids = torch.from_numpy(np.asarray(tokens[start:start + seq], dtype=np.int64))
            return {"input_ids": ids, "labels": ids.clone()}

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = json.loads(sys.argv[9])
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)

    class Stamp(TrainerCallback):
        def __init__(self):
            self.times = []
        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

    stamp = Stamp()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=micro, max_steps=steps,
                             learning_rate=3e-3, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
                             deepspeed=ds_config, logging_strategy="no",
                             save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[stamp]).train()
    if torch.distributed.get_rank() == 0:
        print(json.dumps({"times": stamp.times}))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *args]  # fmt: skip


ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def tokens_per_second(times: list[float]) -> float:
    window = times[WARMUP:]
    return (len(window) - 1) * GLOBAL_BATCH * SEQ / (window[-1] - window[0])


def run_trainer(layout: Path, model: Path, data: Path, steps: int) -> float:
    proc = subprocess.run(
        torchrun("-m", "shardwise_trainer", "--layout", str(layout), "--steps", str(steps),
                 "--data", str(data), "--hf-model", str(model)),
        capture_output=True, text=True, env=ENV, check=False, timeout=1200,
    )  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"trainer failed:\n{proc.stderr[-4000:]}")
    times = [json.loads(x)["time"] for x in proc.stdout.splitlines() if x.startswith('{"event": "step"')]
    return tokens_per_second(times)


def run_reference(work: Path, model: Path, data: Path, ds_config: Path, steps: int) -> float:
    script = work / "reference.py"
    script.write_text(REFERENCE)
    proc = subprocess.run(
        torchrun(str(script), str(model), str(data), str(ds_config), str(steps), str(SEQ), str(MICRO),
                 str(RANK), str(work / "hf-out"), json.dumps(HF_TARGETS)),
        capture_output=True, text=True, env=ENV, check=False, timeout=1200,
    )  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"reference failed:\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith('{"times"')][-1]
    return tokens_per_second(json.loads(line)["times"])


def plan_lora_layout(work: Path) -> Path:
    """The benchmark's layout: the tiny Llama's LoRA job planned for DP2 ZeRO-2 by `shardwise plan`."""
    from tests import tiny_models

    arch = {**tiny_models.SPEC_ARCH["llama"], "layers": 4, "hiddenSize": 128, "ffnHiddenSize": 256}
    job = {"apiVersion": "shardwise.dev/v1alpha1", "kind": "ParallelTrainingJob",
           "metadata": {"name": "b"},
           "spec": {"model": {"architecture": arch},
                    "training": {"method": "lora", "precision": "fp32", "sequenceLength": SEQ,
                                 "globalBatchSize": GLOBAL_BATCH, "loraRank": RANK,
                                 "loraTargets": TARGETS, "learningRate": 3e-3}}}  # fmt: skip
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    layout = work / "layout.json"
    subprocess.run(
        [sys.executable, "-m", "shardwise.cli", "plan", str(work / "job.yaml"), "--gpus", "2",
         "--gpu-memory", "16GiB", "--tp", "1", "--pp", "1", "--zero", "2", "--micro-batch", str(MICRO),
         "--offload", "none", "--checkpointing", "none", "--layout-out", str(layout)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return layout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    opts = parser.parse_args()
    from tests import tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = tiny_models.llama(work / "model", layers=4, hidden=128, ffn=256)
        data = tiny_models.skewed_tokens(work / "tokens.bin", n=200_000)
        layout = plan_lora_layout(work)
        ds = json.loads(layout.read_text())["deepspeed"]
        ds["optimizer"]["params"]["torch_adam"] = True  # what the trainer runs without offload
        ds["steps_per_print"] = 10**9
        ds_config = work / "ds_config.json"
        ds_config.write_text(json.dumps(ds))
        ours: list[float] = []
        theirs: list[float] = []
        load_before = os.getloadavg()[0]
        for _ in range(opts.runs):
            ours.append(run_trainer(layout, model, data, opts.steps))
            theirs.append(run_reference(work, model, data, ds_config, opts.steps))
            print(f"trainer {ours[-1]:.0f} tokens/s, reference {theirs[-1]:.0f} tokens/s", flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    # Other work on the machine slows both sides alike (runs alternate), but say how busy it was.
    load = (load_before, os.getloadavg()[0])
    doc: dict[str, Any] = {
        "machine": platform.platform(), "cpus": os.cpu_count(), "steps": opts.steps, "warmup": WARMUP,
        "trainer_tokens_per_s": ours, "reference_tokens_per_s": theirs,
        "median_trainer": a, "median_reference": b, "ratio": a / b, "load_average_1m": load,
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lora_vs_hf_trainer.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "lora_vs_hf_trainer.md").write_text(
        "# LoRA: shardwise_trainer vs transformers Trainer + DeepSpeed + peft\n\n"
        f"Tiny Llama (4 layers, h=128), LoRA r={RANK} on all 7 projections, DP2 ZeRO-2 fp32, micro 2, "
        f"sequence {SEQ}, {opts.steps} steps ({WARMUP} warm-up), CPU, {os.cpu_count()} cores, "
        f"{opts.runs} alternating runs each (`python benchmarks/lora_vs_hf_trainer.py`); 1-minute load "
        f"average {load[0]:.1f} at the start, {load[1]:.1f} at the end.\n\n"
        "| | median tokens/s | runs |\n|---|---|---|\n"
        f"| shardwise_trainer | {a:.0f} | {', '.join(f'{x:.0f}' for x in ours)} |\n"
        f"| Trainer + DeepSpeed + peft | {b:.0f} | {', '.join(f'{x:.0f}' for x in theirs)} |\n\n"
        f"Ratio (trainer / reference): {a / b:.3f}.\n"
    )


if __name__ == "__main__":
    main()
