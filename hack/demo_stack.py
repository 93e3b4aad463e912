"""The demos' local stack: control plane + CRD, the local node runner (2 nodes x 2 CPU "GPUs")
and the operator, started in order and stopped at the end (hack/demo, hack/demo --finetune)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tests.operator_process import OperatorProcess, running_operator, stop_process  # noqa: E402

from cluster import LocalCluster  # noqa: E402

CRD = ROOT / "crds" / "paralleltrainingjobs.shardwise.dev.yaml"
RUNNER_NAME = "cpu"


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


@dataclass
class Stack:
    """What a demo talks to: the cluster, the operator and where the node runner keeps pod logs."""

    cluster: LocalCluster
    operator: OperatorProcess
    runner_dir: Path

    def pod_log(self, namespace: str, pod: str) -> str:
        path = self.runner_dir / "logs" / namespace / f"{pod}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def local_stack(state: Path) -> Iterator[Stack]:
    """Start everything under ``state``; stop it all when the block ends."""
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
                "--nodes", "2", "--gpus-per-node", "2", "--name-prefix", RUNNER_NAME,
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
            yield Stack(cluster, op, runner_dir)
    finally:
        if runner is not None:
            stop_process(runner, timeout=30)
        cluster.stop()
