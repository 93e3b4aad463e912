"""Node loss end to end: a job of 2 nodes x 2 processes with checkpoints on a shared hostPath loses
a node after a checkpoint, is re-planned for the node left (1 x 2), resumes from the checkpoint's
step (DP4 ZeRO-2 -> DP2 through the universal conversion), and continues the curve of an
uninterrupted run of the new layout from that checkpoint.

The two nodes are two node runners (one node each) so one of them can really go away: its runner
(the kubelet) is killed, its Node deleted, and nothing registers it again; its processes are
killed once the operator has reacted (the runner's pid files), as a dead machine's would be.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.jobs_e2e import json_lines, tiny_job
from tests.jobs import Kubectl, condition_is, wait_for

from shardwise.resources.names import LABEL_ATTEMPT

pytestmark = pytest.mark.e2e

STEPS, EVERY = 200, 10
#: The equivalence tests' tolerance (tests/trainer/test_trainer_equivalence.py).
TOLERANCE = 1e-4
POOL_LABEL = "shardwise.dev/e2e-pool"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _losses(stdout: str) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in json_lines(stdout) if r.get("event") == "step"}


def test_a_lost_node_replans_for_the_node_left_and_resumes_from_the_checkpoint(
    start_node_runner: Any, cluster: Any, shardwise_operator: Any, tmp_path: Path
) -> None:
    pool = uuid.uuid4().hex[:6]
    label = [f"--label={POOL_LABEL}={pool}"]
    keep = start_node_runner(nodes=1, gpus_per_node=2, extra_args=label)
    # The lost node's ranks (2, 3) run slowed, so the first attempt is still running when it goes.
    lost = start_node_runner(
        nodes=1, gpus_per_node=2, extra_args=[*label, "--env=SHARDWISE_TEST_SLOW_RANK=2:4.0"]
    )
    kubectl = Kubectl(cluster)
    namespace = f"nodeloss-{pool}"
    kubectl("create", "namespace", namespace)
    ckpt = tmp_path / "ckpt"
    job = tiny_job(
        "shrink", namespace, {POOL_LABEL: pool},
        "--steps", str(STEPS), "--checkpoint-dir", "/ckpt", "--checkpoint-every", str(EVERY),
        "--checkpoint-keep", str(STEPS // EVERY + 1),  # keep the step the new attempt resumes from
        parallelism={"tensor": 1, "pipeline": 1, "zeroStage": 2},
        resources={"nodes": 2, "gpusPerNode": 2, "gpuMemory": "2GiB", "nodeMemory": "4GiB",
                   "nodeSelector": {POOL_LABEL: pool}},
        runPolicy={"maxRestarts": 0, "replanOnNodeLoss": True},
        monitoring={"scrapeIntervalSeconds": 1},
    )  # fmt: skip
    pod_spec = job["spec"]["template"]["spec"]
    pod_spec["containers"][0]["volumeMounts"] = [{"name": "ckpt", "mountPath": "/ckpt"}]
    pod_spec["volumes"] = [{"name": "ckpt", "hostPath": {"path": str(ckpt), "type": "DirectoryOrCreate"}}]
    kubectl.apply(job)

    first = wait_for(
        "a checkpoint of the 2-node attempt",
        lambda: (
            int(
                ((j := kubectl.job(namespace, "shrink"))["status"].get("latestCheckpoint") or {}).get(
                    "step", 0
                )
            )
            >= EVERY
            and j
        ),
        timeout=300,
        interval=1,
    )
    assert first["status"]["layout"]["nodes"] == 2 and first["status"]["layout"]["data"] == 4
    # The node dies: its runner (the kubelet) crashes, reporting nothing, and the Node goes.
    lost.stop(signal.SIGKILL)
    kubectl("delete", "node", lost.nodes[0], "--wait=false")
    wait_for(
        "the operator restarting the gang",
        lambda: int(kubectl.job(namespace, "shrink")["status"].get("attempt") or 0) >= 1,
        timeout=120,
        interval=0.5,
    )
    # Only now do its processes end (the machine is gone), so the survivor's failure does not race
    # the node's disappearance.
    killed = [_kill_group(pid_file) for pid_file in lost.state_dir.rglob("pid")]
    assert any(killed), list(lost.state_dir.rglob("pid"))

    done = wait_for(
        "shrink finished",
        lambda: (
            (j := kubectl.job(namespace, "shrink"))["status"].get("phase") in ("Succeeded", "Failed") and j
        ),
        timeout=600,
        interval=1,
    )
    log = keep.pod_log(namespace, "shrink-node-0")
    assert condition_is(done, "Succeeded", "True", "AllPodsSucceeded"), (done["status"], log[-4000:])
    status = done["status"]
    assert status["layout"]["nodes"] == 1 and status["layout"]["gpusPerNode"] == 2
    assert (status["layout"]["tensor"], status["layout"]["pipeline"], status["layout"]["data"]) == (1, 1, 2)
    assert int(status.get("restarts") or 0) == 0  # a lost node is not the job's fault
    assert any(e["reason"] == "Replanned" for e in kubectl.events(namespace, "shrink"))
    attempt = int(status["attempt"])
    [pod] = [
        p
        for p in kubectl.pods(namespace, "shrink")
        if p["metadata"]["labels"].get(LABEL_ATTEMPT) == str(attempt)
    ]
    assert pod["spec"]["nodeName"] == keep.nodes[0]

    records = json_lines(log)
    [resume] = [r for r in records if r.get("event") == "resume"]
    assert resume["step"] >= EVERY and resume["step"] % EVERY == 0 and resume["universal"] is True
    resumed = _losses(log)
    assert sorted(resumed) == list(range(resume["step"] + 1, STEPS + 1))

    # The uninterrupted run of the new layout from that checkpoint: the same trainer, the planned
    # layout of the last attempt, a copy of the checkpoint the job resumed from (written at DP4).
    layout = tmp_path / "layout.json"
    layout.write_text(
        kubectl.json("get", "configmap", "shrink-layout", "-n", namespace)["data"]["layout.json"]
    )
    assert json.loads(layout.read_text())["layout"]["dp"] == 2
    alone = tmp_path / "alone"
    alone.mkdir()
    tag = f"step{resume['step']}"
    shutil.copytree(ckpt / tag, alone / tag)
    (alone / "latest").write_text(tag)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
        "-m", "shardwise_trainer", "--layout", str(layout), "--steps", str(STEPS), "--synthetic-data",
        "--checkpoint-dir", str(alone), "--checkpoint-every", str(STEPS),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**_trainer_env(), "OMP_NUM_THREADS": "1"},
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    reference = _losses(proc.stdout)
    assert sorted(reference) == sorted(resumed)
    diffs = {s: abs(loss - reference[s]) for s, loss in resumed.items()}
    assert max(diffs.values()) <= TOLERANCE, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    print(f"node loss: resumed at step {resume['step']} of {STEPS}, max |dloss| {max(diffs.values()):.2e}")


def _kill_group(pid_file: Path) -> bool:
    """SIGKILL the process group a node runner recorded for a pod (``<pid> <start ticks>``)."""
    try:
        os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        return False
    return True


def _trainer_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDWISE_")}
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return env
