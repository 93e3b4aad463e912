"""The README's quick start: plan and train a tiny model on CPU through the real operator path.

Starts the project's local control plane (etcd, kube-apiserver, controller-manager, scheduler,
KWOK), installs the CRD, runs `shardwise operator`, starts the local node runner with 2 nodes ×
2 "GPUs" (CPU processes), prints `shardwise plan` for examples/tiny-cpu.yaml, applies it, follows
the job to Succeeded, and prints the loss curve, the per-rank memory table (measured vs planned)
and the metrics the trainer and the operator export. Everything is stopped at the end.

With --finetune it instead LoRA-fine-tunes a tiny pretrained model (built offline: random weights,
a tokenizer trained on a few sentences, a chat template) on a small JSON-lines chat file, through
examples/tiny-cpu-finetune.yaml (spec.model.path / data / output on hostPath volumes), and prints
the plan, the losses, the validation loss and where the adapter went (hack/demo_finetune.py).

    hack/demo [--steps N] [--keep] [--finetune]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "hack")]

from demo_stack import kubectl, local_stack, say  # noqa: E402
from tests.e2e.jobs_e2e import json_lines, tiny_job  # noqa: E402

EXAMPLE = ROOT / "examples" / "tiny-cpu.yaml"
GIB = 1 << 30
DEFAULT_STEPS = 60


def scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps to train (default {DEFAULT_STEPS}; 30 with --finetune)",
    )
    parser.add_argument("--keep", action="store_true", help="leave everything running at the end")
    parser.add_argument(
        "--finetune",
        action="store_true",
        help="LoRA-fine-tune a tiny pretrained model on chat records instead (default 30 steps)",
    )
    args = parser.parse_args()
    if args.finetune:
        from demo_finetune import finetune  # noqa: PLC0415  (hack/, beside this file)

        return finetune(steps=args.steps or 30, keep=args.keep)
    steps_total = args.steps or DEFAULT_STEPS

    say("plan (offline): shardwise plan examples/tiny-cpu.yaml")
    subprocess.run([sys.executable, "-m", "shardwise.cli", "plan", str(EXAMPLE)], check=True)

    state = Path(tempfile.mkdtemp(prefix="shardwise-demo-"))
    with local_stack(state) as stack:
        cluster, op, runner_dir = stack.cluster, stack.operator, stack.runner_dir
        job = tiny_job(
            "tiny-cpu",
            "default",
            {"shardwise.dev/local-runner-name": "cpu"},
            *("--steps", str(steps_total), "--checkpoint-every", "0", "--linger-seconds", "6"),
            # Scrape often so that a short demo run shows the operator's per-GPU analysis.
            monitoring={"scrapeIntervalSeconds": 1},
        )
        kubectl(cluster, "apply", "-f", "-", stdin=yaml.safe_dump(job))
        say("applied examples/tiny-cpu.yaml; following the job")

        phase, last_trainer_metrics, last_operator_metrics = "", None, None
        deadline = time.monotonic() + 600
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = json.loads(kubectl(cluster, "get", "ptj", "tiny-cpu", "-o", "json")).get("status") or {}
            if status.get("phase") != phase:
                phase = str(status.get("phase"))
                print(f"   phase {phase}: {status.get('message', '')}", flush=True)
            if phase == "Running":
                pods = json.loads(
                    kubectl(cluster, "get", "pods", "-l", "shardwise.dev/job-name=tiny-cpu", "-o", "json")
                )
                for pod in pods["items"]:
                    ip = pod["status"].get("podIP")
                    text = scrape(f"http://{ip}:9400/metrics") if ip else None
                    if text and "shardwise_trainer_step " in text.replace("{", " "):
                        last_trainer_metrics = text
                text = scrape(op.metrics_url)
                if text and "shardwise_rank_step_seconds{" in text:
                    last_operator_metrics = text
            if phase in ("Succeeded", "Failed"):
                break
            time.sleep(1)
        print(kubectl(cluster, "get", "ptj", "-o", "wide"))

        logs = {
            rank: (runner_dir / "logs" / "default" / f"tiny-cpu-node-{rank}.log").read_text(errors="replace")
            for rank in (0, 1)
            if (runner_dir / "logs" / "default" / f"tiny-cpu-node-{rank}.log").exists()
        }
        records = [r for log in logs.values() for r in json_lines(log)]
        steps = [r for r in records if "step" in r and "loss" in r and "tokens_per_s" in r]
        if steps:
            say("training (rank 0, one JSON line per step)")
            for r in steps[:: max(1, len(steps) // 10)] + ([steps[-1]] if len(steps) > 10 else []):
                print(f"   step {r['step']:4d}  loss {r['loss']:.4f}  tokens/s {r['tokens_per_s']:.0f}")
        ranks = sorted(
            {r["rank"]: r for r in records if "model_state_bytes" in r}.values(), key=lambda r: r["rank"]
        )
        cm = json.loads(kubectl(cluster, "get", "configmap", "tiny-cpu-layout", "-o", "json"))
        layout_doc = json.loads(cm["data"]["layout.json"])
        per_stage = layout_doc["predicted"]["per_stage"]
        lay = layout_doc["layout"]
        if ranks:
            say("per-rank memory: measured model states vs the plan")
            print("   rank  stage  measured model states  planned model states  error   peak memory (RSS)")
            for r in ranks:
                stage = r["rank"] // (lay["dp"] * lay["tp"])
                planned = per_stage[stage]["model_state_bytes"]
                error = (r["model_state_bytes"] - planned) / planned * 100 if planned else 0.0
                print(
                    f"   {r['rank']:4d}  {stage:5d}  {r['model_state_bytes']:>18,d} B  {planned:>18,d} B"
                    f"  {error:+5.1f}%  {r['peak_memory_bytes'] / GIB:8.2f} GiB"
                )
        if last_trainer_metrics:
            say("trainer metrics (a pod's stats endpoint during the run)")
            for line in last_trainer_metrics.splitlines():
                if line.startswith("shardwise_trainer_") and ('rank="0"' in line or 'rank="2"' in line):
                    print(f"   {line}")
        if last_operator_metrics:
            say("operator's per-GPU analysis while the job ran (memory balance, stragglers)")
            wanted = (
                "shardwise_gpu_memory_used_bytes",
                "shardwise_gpu_model_state_bytes",
                "shardwise_gpu_model_state_predicted_bytes",
                "shardwise_rank_step_seconds",
                "shardwise_rank_straggler_score",
                "shardwise_job_memory_imbalance_ratio",
                "shardwise_job_stragglers",
                "shardwise_job_tokens_per_second",
            )
            for line in last_operator_metrics.splitlines():
                if line.startswith(wanted):
                    print(f"   {line}")
        say("operator metrics")
        for line in (scrape(op.metrics_url) or "").splitlines():
            if line.startswith(
                (
                    "shardwise_jobs",
                    "shardwise_job_layout_info",
                    "shardwise_operator_reconcile_duration_seconds_count",
                )
            ):
                print(f"   {line}")
        if args.keep:
            say("--keep: leaving everything running; export KUBECONFIG=" + str(cluster.kubeconfig))
            input("press Enter to stop ")
        ok = phase == "Succeeded" and bool(steps) and steps[-1]["loss"] < steps[0]["loss"]
        say("demo " + ("succeeded: the job trained to Succeeded with a decreasing loss" if ok else "FAILED"))
        if not ok:
            print(op.log()[-5000:])
            for rank, log in logs.items():
                print(f"--- pod tiny-cpu-node-{rank} log tail\n{log[-3000:]}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
