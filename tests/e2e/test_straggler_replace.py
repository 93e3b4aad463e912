"""stragglerPolicy Replace end to end: a DP2 job (2 nodes x 1 process) with rank 1's forward slowed
by the trainer's test switch (extra matmuls inside the model, not a sleep after the step) is found
through the operator's scrape, its node excluded, the job re-planned for the one node left and
resumed from its latest checkpoint, to Succeeded."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.jobs_e2e import json_lines, tiny_job
from tests.jobs import Kubectl, condition_is, wait_for

from shardwise.resources.names import LABEL_ATTEMPT

pytestmark = pytest.mark.e2e

STEPS, EVERY = 300, 10


def test_replace_excludes_the_slow_node_replans_and_resumes(
    cluster: Any, start_node_runner: Any, shardwise_operator: Any, tmp_path: Path
) -> None:
    # Only rank 1 exists at DP2: once its node is gone the job runs at DP1 and nothing is slowed.
    runner = start_node_runner(gpus_per_node=1, extra_args=["--env=SHARDWISE_TEST_SLOW_RANK=1:2.0"])
    kubectl = Kubectl(cluster)
    namespace = f"replace-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)
    ckpt = tmp_path / "ckpt"
    job = tiny_job(
        "slow", namespace, runner.node_selector,
        "--steps", str(STEPS), "--checkpoint-dir", "/ckpt", "--checkpoint-every", str(EVERY),
        parallelism={"tensor": 1, "pipeline": 1, "zeroStage": 1},
        resources={"nodes": 2, "gpusPerNode": 1, "gpuMemory": "2GiB", "nodeMemory": "4GiB",
                   "nodeSelector": runner.node_selector},
        runPolicy={"maxRestarts": 0},
        monitoring={"scrapeIntervalSeconds": 1, "stragglerThreshold": 0.3, "stragglerPolicy": "Replace"},
    )  # fmt: skip
    pod_spec = job["spec"]["template"]["spec"]
    pod_spec["containers"][0]["volumeMounts"] = [{"name": "ckpt", "mountPath": "/ckpt"}]
    pod_spec["volumes"] = [{"name": "ckpt", "hostPath": {"path": str(ckpt), "type": "DirectoryOrCreate"}}]
    kubectl.apply(job)

    replaced = wait_for(
        "the straggler's node excluded",
        lambda: (j := kubectl.job(namespace, "slow"))["status"].get("excludedNodes") and j,
        timeout=300,
        interval=1,
    )
    [excluded] = replaced["status"]["excludedNodes"]
    assert excluded["reason"] == "Straggler" and excluded["name"] in runner.nodes
    assert "rank 1" in excluded["message"], excluded
    assert replaced["status"]["stragglerReplacements"] == 1
    assert int(replaced["status"].get("restarts") or 0) == 0  # not the job's fault: budget kept
    events = {e["reason"]: e["message"] for e in kubectl.events(namespace, "slow")}
    assert excluded["name"] in events["StragglerReplaced"], events

    done = wait_for(
        "slow finished",
        lambda: (j := kubectl.job(namespace, "slow"))["status"].get("phase") in ("Succeeded", "Failed") and j,
        timeout=420,
        interval=1,
    )
    log = runner.pod_log(namespace, "slow-node-0")
    assert condition_is(done, "Succeeded", "True", "AllPodsSucceeded"), (done["status"], log[-4000:])
    assert done["status"]["layout"]["nodes"] == 1 and done["status"]["layout"]["data"] == 1
    assert done["status"]["attempt"] == 1
    # The new attempt ran elsewhere and resumed from a checkpoint, through the universal conversion
    # (DP2 ZeRO-1 -> DP1), not from step 0.
    [pod] = [p for p in kubectl.pods(namespace, "slow") if p["metadata"]["labels"].get(LABEL_ATTEMPT) == "1"]
    assert pod["spec"]["nodeName"] != excluded["name"]
    records = json_lines(log)
    [resume] = [r for r in records if r.get("event") == "resume"]
    assert resume["step"] >= EVERY and resume["step"] % EVERY == 0 and resume["universal"] is True
    steps = [r["step"] for r in records if r.get("event") == "step"]
    assert steps == list(range(resume["step"] + 1, STEPS + 1))
