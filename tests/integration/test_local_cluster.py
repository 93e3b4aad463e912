"""The local control plane itself: real scheduling, real garbage collection, real tokens.

These tests pin down what the operator's integration tests rely on: KWOK GPU nodes with the
GPU Feature Discovery labels, the real kube-scheduler placing GPU pods (and refusing too-large
ones), KWOK moving pods to Running and keeping them there until a test ends them,
owner-reference garbage collection by kube-controller-manager, ServiceAccount tokens, and
`down` leaving no process behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from cluster import LocalCluster, jwt_claims, pid_alive

pytestmark = pytest.mark.integration

DEFAULT_NODES = ("gpu-node-0", "gpu-node-1")


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60.0, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def gpu_pod(name: str, gpus: int, **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "trainer",
                    "image": "example.invalid/trainer:latest",  # never pulled: KWOK fakes the kubelet
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ],
        },
    }


def pod(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any]:
    return cluster.kubectl_json("get", "pod", name, "-n", namespace)


def test_nodes_carry_gpu_capacity_and_gfd_labels(cluster: LocalCluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in cluster.kubectl_json("get", "nodes")["items"]}
    assert set(DEFAULT_NODES) <= set(nodes)
    for name in DEFAULT_NODES:
        node = nodes[name]
        labels, status = node["metadata"]["labels"], node["status"]
        assert status["capacity"]["nvidia.com/gpu"] == "8"
        assert status["allocatable"]["nvidia.com/gpu"] == "8"
        for resource in ("cpu", "memory", "pods"):
            assert resource in status["allocatable"]
        assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert labels["nvidia.com/gpu.memory"] == "81559"
        assert labels["nvidia.com/gpu.count"] == "8"
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        ready = {c["type"]: c["status"] for c in status["conditions"]}["Ready"]
        assert ready == "True"


def test_server_is_the_pinned_release(cluster: LocalCluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == version["clientVersion"]["gitVersion"]
    assert version["serverVersion"]["gitVersion"].startswith("v1.")


def test_up_is_idempotent(cluster: LocalCluster) -> None:
    before = cluster.pids()
    cluster.up()
    assert cluster.pids() == before
    assert all(pid_alive(pid) for pid in before.values())


def test_gpu_pod_is_scheduled_onto_a_kwok_node_and_runs_until_ended(
    cluster: LocalCluster, namespace: str
) -> None:
    cluster.apply(gpu_pod("full-node", 8), namespace)
    running = wait_for(
        "pod Running",
        lambda: (p := pod(cluster, namespace, "full-node"))["status"].get("phase") == "Running" and p,
    )
    assert running["spec"]["nodeName"] in DEFAULT_NODES
    conditions = {c["type"]: c["status"] for c in running["status"]["conditions"]}
    assert conditions["PodScheduled"] == "True"
    assert conditions["Ready"] == "True"
    events = cluster.kubectl_json("get", "events", "-n", namespace, "--field-selector=reason=Scheduled")
    assert any(e.get("reportingComponent") == "default-scheduler" for e in events["items"]), events

    # Not owned by a batch Job, so KWOK leaves it Running until the test ends it.
    time.sleep(2)
    assert pod(cluster, namespace, "full-node")["status"]["phase"] == "Running"

    cluster.kubectl("annotate", "pod", "full-node", "-n", namespace, "kwok.shardwise.dev/exit-code=0")
    done = wait_for(
        "pod Succeeded",
        lambda: (p := pod(cluster, namespace, "full-node"))["status"]["phase"] == "Succeeded" and p,
    )
    assert done["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"


def test_a_pod_can_be_failed_with_an_exit_code(cluster: LocalCluster, namespace: str) -> None:
    cluster.apply(gpu_pod("doomed", 1), namespace)
    wait_for("pod Running", lambda: pod(cluster, namespace, "doomed")["status"].get("phase") == "Running")
    cluster.kubectl(
        "annotate",
        "pod",
        "doomed",
        "-n",
        namespace,
        "kwok.shardwise.dev/exit-code=137",
        "kwok.shardwise.dev/reason=OOMKilled",
    )
    failed = wait_for(
        "pod Failed", lambda: (p := pod(cluster, namespace, "doomed"))["status"]["phase"] == "Failed" and p
    )
    terminated = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 137
    assert terminated["reason"] == "OOMKilled"


def test_too_many_gpus_stay_pending_until_a_bigger_node_is_added(
    cluster: LocalCluster, namespace: str
) -> None:
    cluster.apply(gpu_pod("too-big", 16), namespace)

    def unschedulable() -> bool:
        conditions = pod(cluster, namespace, "too-big")["status"].get("conditions", [])
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conditions)

    wait_for("PodScheduled=False/Unschedulable", unschedulable)
    events = cluster.kubectl_json(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector=reason=FailedScheduling,involvedObject.name=too-big",
    )["items"]
    assert events, "no FailedScheduling event"
    assert "Insufficient nvidia.com/gpu" in events[0]["message"]
    assert pod(cluster, namespace, "too-big")["status"]["phase"] == "Pending"

    added = cluster.add_gpu_nodes(names=["big-gpu-node-0"], gpus_per_node=16, gpu_product="NVIDIA-B200")
    assert added == ["big-gpu-node-0"]
    node = cluster.kubectl_json("get", "node", "big-gpu-node-0")
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "16"
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-B200"
    running = wait_for(
        "pod Running on the new node",
        lambda: (p := pod(cluster, namespace, "too-big"))["status"].get("phase") == "Running" and p,
        timeout=120,
    )
    assert running["spec"]["nodeName"] == "big-gpu-node-0"


def test_owner_reference_garbage_collection(cluster: LocalCluster, namespace: str) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace, "--from-literal=a=1")
    uid = cluster.kubectl_json("get", "configmap", "owner", "-n", namespace)["metadata"]["uid"]
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid, "controller": True}
            ],
        },
        "data": {"b": "2"},
    }
    cluster.apply(child, namespace)
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)

    def child_gone() -> bool:
        out = cluster.kubectl(
            "get", "configmap", "child", "-n", namespace, "--ignore-not-found", "-o", "name"
        )
        return not out.strip()

    wait_for("the garbage collector to delete the child ConfigMap", child_gone, timeout=90)


def test_service_account_token_authenticates(cluster: LocalCluster, namespace: str) -> None:
    cluster.kubectl("create", "serviceaccount", "tester", "-n", namespace)
    token = cluster.kubectl("create", "token", "tester", "-n", namespace).strip()
    assert jwt_claims(token)["sub"] == f"system:serviceaccount:{namespace}:tester"

    kubeconfig = cluster.service_account_kubeconfig(namespace, "tester", create=False)
    review = json.loads(cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig))
    assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:tester"
    # Authenticated but not authorised: RBAC is really enforced.
    denied = cluster.kubectl(
        "auth", "can-i", "list", "pods", "-n", namespace, kubeconfig=kubeconfig, check=False
    )
    assert denied.strip() == "no"


def test_second_cluster_coexists_and_down_leaves_nothing_running(cluster: LocalCluster) -> None:
    other = LocalCluster(gpu_nodes=1, gpus_per_node=4)
    try:
        other.start()
        assert other.port_base != cluster.port_base
        pids = other.pids()
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
        assert all(pid_alive(pid) for pid in pids.values())
        nodes = other.kubectl_json("get", "nodes")["items"]
        assert [n["status"]["allocatable"]["nvidia.com/gpu"] for n in nodes] == ["4"]
    finally:
        other.stop()
    assert not [name for name, pid in pids.items() if pid_alive(pid)]
    assert not other.state_dir.exists()
    # The session cluster is untouched.
    assert all(pid_alive(pid) for pid in cluster.pids().values())


def test_up_on_an_earlier_state_applies_the_requested_shape(cluster: LocalCluster) -> None:
    other = LocalCluster(gpu_nodes=3, gpus_per_node=4)
    try:
        other.start()
        other.add_gpu_nodes(names=["extra-node-0"])
        other.kubectl("create", "namespace", "leftover")
        assert other._script("down").returncode == 0

        # A new user's `up --gpu-nodes 1` with another GPU shape on that state dir.
        result = other._script(
            "up", "--gpu-nodes=1", "--gpus-per-node=2", "--gpu-product=NVIDIA-L4", "--gpu-memory-mib=23034"
        )
        assert result.returncode == 0, result.stderr
        nodes = {n["metadata"]["name"]: n for n in other.kubectl_json("get", "nodes")["items"]}
        assert set(nodes) == {"gpu-node-0", "extra-node-0"}
        assert nodes["gpu-node-0"]["status"]["allocatable"]["nvidia.com/gpu"] == "2"
        assert nodes["gpu-node-0"]["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-L4"
        assert "removed 2 node(s)" in result.stderr and "gpu-node-1, gpu-node-2" in result.stderr
        assert "recreated 1 node(s) with the requested GPU shape: gpu-node-0" in result.stderr
        # The node `up` did not create is kept, and the message says so and how to start fresh.
        assert "kept 1 node(s) `up` did not create (add-nodes): extra-node-0" in result.stderr
        assert "reusing the cluster state of an earlier run" in result.stderr
        assert "down --purge" in result.stderr

        # A second identical `up` changes nothing and says nothing about removing.
        again = other._script(
            "up", "--gpu-nodes=1", "--gpus-per-node=2", "--gpu-product=NVIDIA-L4", "--gpu-memory-mib=23034"
        )
        assert again.returncode == 0, again.stderr
        assert "removed" not in again.stderr and "recreated" not in again.stderr
        assert "reusing" not in again.stderr
    finally:
        other.stop()
