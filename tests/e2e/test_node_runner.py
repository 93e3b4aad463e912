"""The local node runner against the real local control plane: pods really run as processes.

Each test creates plain pods (no operator) in a fresh namespace and watches what the runner
reports through the API server: phase, pod IP, exit code, termination message, deletion.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # the fixtures' types; tests/e2e/conftest.py defines the fixtures
    from conftest import NodeRunner, StartNodeRunner

    from cluster import LocalCluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def wait_for(check: Callable[[], Any], timeout: float = 60, interval: float = 0.3, what: str = "it") -> Any:
    """Poll until check() returns something truthy; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}")


def get(cluster: LocalCluster, *args: str) -> dict[str, Any] | None:
    """kubectl get ... -o json; None when the object does not exist."""
    out = cluster.kubectl("get", *args, "-o", "json", "--ignore-not-found", check=False)
    return json.loads(out) if out.strip() else None


def create(cluster: LocalCluster, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def pod(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "busybox:stable", "command": command}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


def wait_phase(
    cluster: LocalCluster, namespace: str, name: str, phases: set[str], timeout: float = 60
) -> dict:
    def check() -> dict | None:
        obj = get(cluster, "pod", name, "-n", namespace)
        return obj if obj and obj.get("status", {}).get("phase") in phases else None

    return wait_for(check, timeout, what=f"pod {namespace}/{name} in {sorted(phases)}")


def terminated(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["status"]["containerStatuses"][0]["state"]["terminated"]


def pid_of(obj: dict[str, Any]) -> int:
    """The process id the runner put in the containerID (node-runner://<uid>/<pid>)."""
    return int(obj["status"]["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_failing_pod_scheduled_by_the_scheduler(
    cluster: LocalCluster, namespace: str, node_runner: NodeRunner
) -> None:
    """$(VAR) expanded, loopback pod IP, env from the downward API, Failed with exit code 3."""
    create(
        cluster,
        namespace,
        pod(
            "fail-3",
            [
                "sh",
                "-c",
                "echo '$(MY_VAR)' > $(OUT); cat $(OUT); echo ip=$POD_IP node=$NODE; "
                "echo '$$(MY_VAR)'; exit 3",
            ],
            nodeSelector=node_runner.node_selector,  # placed by the real kube-scheduler
            container={
                "env": [
                    {"name": "MY_VAR", "value": "expanded-$(OTHER)"},
                    {"name": "OTHER", "value": "late"},
                    {"name": "OUT", "value": "/scratch/out.txt"},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                ],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            },
            volumes=[{"name": "scratch", "emptyDir": {}}],
        ),
    )
    obj = wait_phase(cluster, namespace, "fail-3", {"Failed", "Succeeded"})
    status = obj["status"]
    assert status["phase"] == "Failed"
    assert obj["spec"]["nodeName"] in node_runner.nodes
    assert status["podIP"].startswith("127.") and status["podIPs"] == [{"ip": status["podIP"]}]
    assert status["hostIP"] == "127.0.0.1"
    state = terminated(obj)
    assert state["exitCode"] == 3 and state["reason"] == "Error"
    assert state["startedAt"] and state["finishedAt"]
    # OTHER is defined after MY_VAR, so the kubelet leaves $(OTHER) as written; $$ escapes.
    assert state["message"].splitlines() == [
        "expanded-$(OTHER)",
        f"ip={status['podIP']} node={obj['spec']['nodeName']}",
        "$(MY_VAR)",
    ]
    assert "expanded-$(OTHER)" in node_runner.pod_log(namespace, "fail-3")
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Ready"] == "False" and conditions["PodScheduled"] == "True"


def test_succeeding_pod_bound_by_node_name(
    cluster: LocalCluster, namespace: str, node_runner: NodeRunner
) -> None:
    """A pod bound by spec.nodeName runs; ConfigMap volume + configMapKeyRef; Succeeded, exit 0."""
    cluster.kubectl("create", "configmap", "cfg", "-n", namespace, "--from-literal=greeting=hello world")
    create(
        cluster,
        namespace,
        pod(
            "ok",
            [
                "sh",
                "-c",
                'read -r got < $(FILE); test "$got" = "$GREETING" && echo "read: $got from $(FILE)"',
            ],
            nodeName=node_runner.nodes[1],
            container={
                "env": [
                    {"name": "FILE", "value": "/etc/cfg/greeting"},
                    {
                        "name": "GREETING",
                        "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}},
                    },
                ],
                "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True}],
            },
            volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}],
        ),
    )
    obj = wait_phase(cluster, namespace, "ok", {"Failed", "Succeeded"})
    state = terminated(obj)
    assert (obj["status"]["phase"], state["exitCode"], state["reason"]) == ("Succeeded", 0, "Completed"), (
        state
    )
    # The mount path was rewritten to the runner's materialized directory (docs/node-runner.md).
    assert state["message"].startswith("read: hello world from ")
    assert not state["message"].endswith(" /etc/cfg/greeting")
    assert obj["status"]["startTime"]
    # `kubectl logs` through the API server to the runner's kubelet log endpoint.
    assert cluster.kubectl("logs", "ok", "-n", namespace) == node_runner.pod_log(namespace, "ok")
    assert cluster.kubectl("logs", "ok", "-n", namespace, "--tail=1") == state["message"] + "\n"


def test_deleted_pod_is_killed_and_removed(
    cluster: LocalCluster, namespace: str, node_runner: NodeRunner
) -> None:
    """SIGTERM on deletion; SIGKILL after the grace period; the pod object is then removed."""
    loop = "echo started; while true; do sleep 0.2; done"
    polite = pod("polite", ["sh", "-c", f"trap 'echo got-sigterm; exit 0' TERM; {loop}"])
    stubborn = pod("stubborn", ["sh", "-c", f"trap '' TERM; {loop}"], terminationGracePeriodSeconds=2)
    for manifest in (polite, stubborn):
        manifest["spec"]["nodeSelector"] = node_runner.node_selector
        create(cluster, namespace, manifest)
    pids = {}
    for name in ("polite", "stubborn"):
        obj = wait_phase(cluster, namespace, name, {"Running"})
        pids[name] = pid_of(obj)
        assert pid_alive(pids[name])
        wait_for(lambda n=name: "started" in node_runner.pod_log(namespace, n), what=f"{name} output")

    started = time.monotonic()
    cluster.kubectl("delete", "pod", "polite", "stubborn", "-n", namespace, "--wait=false")
    for name in ("polite", "stubborn"):
        wait_for(lambda n=name: get(cluster, "pod", n, "-n", namespace) is None, 60, what=f"{name} removed")
        assert not pid_alive(pids[name])
    assert "got-sigterm" in node_runner.pod_log(namespace, "polite")
    assert "got-sigterm" not in node_runner.pod_log(namespace, "stubborn")
    assert time.monotonic() - started >= 2  # the stubborn one got its grace period


SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
conn, peer = srv.accept()
conn.sendall(b"pong from " + sys.argv[1].encode())
conn.close()
print("served", peer[0])
"""

CLIENT = """
import os, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
for _ in range(200):
    try:
        # From its own pod IP: by default the kernel picks 127.0.0.1 as the source address.
        conn = socket.create_connection((host, int(port)), 2, (os.environ["POD_IP"], 0))
        break
    except OSError:
        time.sleep(0.1)
print(conn.recv(100).decode(), "via", sys.argv[1])
"""


def test_pods_reach_each_other_by_hostname_and_subdomain(
    cluster: LocalCluster, namespace: str, node_runner: NodeRunner
) -> None:
    """`<hostname>.<subdomain>[.<ns>.svc.cluster.local]` in args is rewritten to the peer's pod IP."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ip_env = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    server = pod(
        "server",
        ["python", "-c", SERVER, "$(POD_IP)", str(port)],
        hostname="srv",
        subdomain="grp",
        nodeName=node_runner.nodes[0],
        container={"env": [ip_env]},
    )
    client = pod(
        "client",
        ["python", "-c", CLIENT, f"srv.grp.{namespace}.svc.cluster.local:{port}"],
        hostname="cli",
        subdomain="grp",
        nodeName=node_runner.nodes[1],
        container={"env": [ip_env]},
    )
    create(cluster, namespace, client)  # first: it waits for the server's name to resolve
    create(cluster, namespace, server)
    srv = wait_phase(cluster, namespace, "server", {"Succeeded", "Failed"})
    cli = wait_phase(cluster, namespace, "client", {"Succeeded", "Failed"})
    server_ip, client_ip = srv["status"]["podIP"], cli["status"]["podIP"]
    assert server_ip != client_ip
    assert terminated(srv)["message"] == f"served {client_ip}", node_runner.pod_log(namespace, "server")
    assert terminated(cli)["message"] == f"pong from {server_ip} via {server_ip}:{port}"


def test_restart_cleans_up_deleted_and_lost_pods(
    cluster: LocalCluster, namespace: str, start_node_runner: StartNodeRunner
) -> None:
    """Pods deleted while the runner is down are finalized on start; a crash's orphans are killed."""
    runner = start_node_runner(nodes=1, gpus_per_node=1)
    node = runner.nodes[0]
    create(cluster, namespace, pod("orphan", ["sh", "-c", "while true; do sleep 0.2; done"], nodeName=node))
    orphan_pid = pid_of(wait_phase(cluster, namespace, "orphan", {"Running"}))

    runner.stop(signal.SIGKILL)  # a crash: no cleanup, the process group survives
    assert pid_alive(orphan_pid)
    create(cluster, namespace, pod("late", ["sh", "-c", "exit 0"], nodeName=node))
    cluster.kubectl("delete", "pod", "late", "-n", namespace, "--wait=false")
    late = get(cluster, "pod", "late", "-n", namespace)
    assert late and late["metadata"].get("deletionTimestamp")  # bound, never run: waits for a kubelet

    runner.start()
    wait_for(lambda: get(cluster, "pod", "late", "-n", namespace) is None, what="late removed")
    orphan = wait_phase(cluster, namespace, "orphan", {"Failed"})
    assert terminated(orphan)["reason"] == "ContainerStatusUnknown"
    wait_for(lambda: not pid_alive(orphan_pid), 10, what="orphan process killed")


def test_nodes_stay_ready_with_lease_renewal(cluster: LocalCluster, node_runner: NodeRunner) -> None:
    """Ready for over a minute (longer than the 50 s node-monitor-grace-period); the Lease renews."""

    def lease_renew_time() -> datetime:
        lease = get(cluster, "lease", node_runner.nodes[0], "-n", "kube-node-lease")
        assert lease and lease["spec"]["holderIdentity"] == node_runner.nodes[0]
        return datetime.strptime(lease["spec"]["renewTime"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)

    first = lease_renew_time()
    wait_for(lambda: lease_renew_time() > first, 20, 1, "the lease's renewTime to advance")

    created = get(cluster, "node", node_runner.nodes[0])
    assert created
    born = datetime.strptime(created["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=UTC
    )
    age = (datetime.now(UTC) - born).total_seconds()
    if age < 65:  # the other tests usually took that long already
        time.sleep(65 - age)
    for name in node_runner.nodes:
        node = get(cluster, "node", name)
        assert node
        ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True", ready
        taints = [t["key"] for t in node["spec"].get("taints") or []]
        assert not any(t.startswith("node.kubernetes.io/") for t in taints), taints
        labels = node["metadata"]["labels"]
        assert labels["shardwise.dev/local-runner"] == "true"
        assert (
            labels["nvidia.com/gpu.count"] == "2" and node["status"]["allocatable"]["nvidia.com/gpu"] == "2"
        )
        assert "kwok.x-k8s.io/node" not in (node["metadata"].get("annotations") or {})
