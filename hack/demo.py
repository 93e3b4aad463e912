"""The README's quick start: plan and train a tiny model on CPU through the real operator path.

Starts the project's local control plane (etcd, kube-apiserver, controller-manager, scheduler,
KWOK), installs the CRD, runs `shardwise operator`, starts the local node runner with 2 nodes ×
2 "GPUs" (CPU processes), prints `shardwise plan` for examples/tiny-cpu.yaml, applies it, follows
the job to Succeeded, and prints the loss curve, the per-rank memory table (measured vs planned)
and the metrics the trainer and the operator export. Everything is stopped at the end.

    hack/demo [--steps N] [--keep]
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tests.e2e.jobs_e2e import json_lines, tiny_job  # noqa: E402
from tests.operator_process import running_operator, stop_process  # noqa: E402

from cluster import LocalCluster  # noqa: E402

EXAMPLE = ROOT / "examples" / "tiny-cpu.yaml"
CRD = ROOT / "crds" / "paralleltrainingjobs.shardwise.dev.yaml"
GIB = 1 << 30


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def kubectl(cluster: LocalCluster, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(cluster.kubectl_path), "--kubeconfig", str(cluster.kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps to train (default 60)")
    parser.add_argument("--keep", action="store_true", help="leave everything running at the end")
    args = parser.parse_args()

    say("plan (offline): shardwise plan examples/tiny-cpu.yaml")
    subprocess.run([sys.executable, "-m", "shardwise.cli", "plan", str(EXAMPLE)], check=True)

    state = Path(tempfile.mkdtemp(prefix="shardwise-demo-"))
    say(f"starting the local control plane (state in {state})")
    cluster = LocalCluster(gpu_nodes=1, state_dir=state / "cluster").start()
    runner: subprocess.Popen[bytes] | None = None
    try:
        kubectl(cluster, "apply", "--server-side", "-f", str(CRD))
        kubectl(
            cluster,
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/paralleltrainingjobs.shardwise.dev",
        )
        ready = state / "runner-ready.json"
        runner_dir = state / "node-runner"
        runner = subprocess.Popen(
            [
                sys.executable, str(ROOT / "hack" / "node-runner"), "--kubeconfig", str(cluster.kubeconfig),
                "--nodes", "2", "--gpus-per-node", "2", "--name-prefix", "cpu",
                "--state-dir", str(runner_dir),
                "--env", "OMP_NUM_THREADS=1", "--cleanup", f"--ready-file={ready}",
            ],
            stdout=(state / "node-runner.out").open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 90
        while not ready.exists():
            if runner.poll() is not None or time.monotonic() > deadline:
                print((state / "node-runner.out").read_text()[-3000:])
                raise SystemExit("the node runner did not start")
            time.sleep(0.2)
        say("local node runner: 2 nodes × 2 CPU 'GPUs' (pods run as local processes on 127.x addresses)")

        with running_operator(cluster.kubeconfig, state / "operator.log") as op:
            say(f"operator running (metrics on {op.metrics_url})")
            job = tiny_job(
                "tiny-cpu",
                "default",
                {"shardwise.dev/local-runner-name": "cpu"},
                *("--steps", str(args.steps), "--checkpoint-every", "0", "--linger-seconds", "6"),
                # Scrape often so that a short demo run shows the operator's per-GPU analysis.
                monitoring={"scrapeIntervalSeconds": 1},
            )
            kubectl(cluster, "apply", "-f", "-", stdin=yaml.safe_dump(job))
            say("applied examples/tiny-cpu.yaml; following the job")

            phase, last_trainer_metrics, last_operator_metrics = "", None, None
            deadline = time.monotonic() + 600
            status: dict[str, Any] = {}
            while time.monotonic() < deadline:
                status = (
                    json.loads(kubectl(cluster, "get", "ptj", "tiny-cpu", "-o", "json")).get("status") or {}
                )
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
                rank: (runner_dir / "logs" / "default" / f"tiny-cpu-node-{rank}.log").read_text(
                    errors="replace"
                )
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
                print(
                    "   rank  stage  measured model states  planned model states  error   peak memory (RSS)"
                )
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
            say(
                "demo "
                + ("succeeded: the job trained to Succeeded with a decreasing loss" if ok else "FAILED")
            )
            if not ok:
                print(op.log()[-5000:])
                for rank, log in logs.items():
                    print(f"--- pod tiny-cpu-node-{rank} log tail\n{log[-3000:]}")
            return 0 if ok else 1
    finally:
        if runner is not None:
            stop_process(runner, timeout=30)
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
