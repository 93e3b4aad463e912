"""The operator's pods really executed: a 2 nodes × 2 processes job trains to Succeeded on CPU."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from tests.e2e.jobs_e2e import json_lines, tiny_job
from tests.jobs import Kubectl, condition_is, wait_for

pytestmark = pytest.mark.e2e


def test_the_operators_pods_train_the_planned_layout_to_succeeded(
    cluster: Any, node_runner: Any, shardwise_operator: Any
) -> None:
    kubectl = Kubectl(cluster)
    namespace = f"e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)
    kubectl.apply(
        tiny_job("tiny", namespace, node_runner.node_selector, "--steps", "40", "--checkpoint-every", "0")
    )

    job = wait_for(
        "Succeeded",
        lambda: (j := kubectl.job(namespace, "tiny"))["status"].get("phase") in ("Succeeded", "Failed") and j,
        timeout=300,
        interval=1,
    )
    logs = {rank: node_runner.pod_log(namespace, f"tiny-node-{rank}") for rank in (0, 1)}
    assert condition_is(job, "Succeeded", "True", "AllPodsSucceeded"), (job["status"], logs[0][-3000:])
    pods = kubectl.pods(namespace, "tiny")
    assert {p["spec"]["nodeName"] for p in pods} == set(node_runner.nodes)
    assert all(p["status"]["podIP"].startswith("127.") for p in pods)

    records = [r for log in logs.values() for r in json_lines(log)]
    steps = [r for r in records if r.get("event") == "step"]
    assert [r["step"] for r in steps] == list(range(1, 41))
    first, last = sum(r["loss"] for r in steps[:5]) / 5, sum(r["loss"] for r in steps[-5:]) / 5
    assert last < first * 0.9, (first, last)

    # Every rank's measured model states agree with the plan in the job's ConfigMap (within 5%).
    layout = json.loads(
        kubectl.json("get", "configmap", "tiny-layout", "-n", namespace)["data"]["layout.json"]
    )
    per_stage = layout["predicted"]["per_stage"]
    ranks = {r["rank"]: r for r in records if r.get("event") == "rank"}
    assert sorted(ranks) == [0, 1, 2, 3]
    for rank, record in ranks.items():
        stage = rank // (layout["layout"]["dp"] * layout["layout"]["tp"])
        planned = per_stage[stage]["model_state_bytes"]
        assert abs(record["model_state_bytes"] - planned) <= 0.05 * planned, (rank, record, planned)
