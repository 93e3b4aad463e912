"""The local node runner's pure parts: $(VAR) expansion, env, rewriting, status and node builders."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "hack" / "node_runner.py"
_spec = importlib.util.spec_from_file_location("node_runner", _PATH)
assert _spec and _spec.loader
nr = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("node_runner", nr)
_spec.loader.exec_module(nr)


# -- $(VAR) expansion: the kubelet's test table (third_party/forked/golang/expansion) -------------

ENV = {"VAR_A": "A", "VAR_B": "B", "VAR_C": "C", "VAR_REF": "$(VAR_A)", "VAR_EMPTY": ""}


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("$(VAR_A)", "A"),
        ("___$(VAR_B)___", "___B___"),
        ("$(VAR_A)-$(VAR_A)", "A-A"),
        ("f000-$$VAR_A", "f000-$VAR_A"),
        ("foo\\$(VAR_C)bar", "foo\\Cbar"),
        ("foo\\\\$(VAR_C)bar", "foo\\\\Cbar"),
        ("$(VAR_A)$(VAR_B)$(VAR_C)", "ABC"),
        ("$(VAR_REF)", "$(VAR_A)"),  # no recursion
        ("$(VAR_EMPTY)", ""),
        ("$(UNKNOWN)", "$(UNKNOWN)"),
        ("$(UNKNOWN)$(VAR_A)", "$(UNKNOWN)A"),
        ("$$(VAR_A)", "$(VAR_A)"),  # escaped
        ("$$$(VAR_A)", "$A"),
        ("$$$$(VAR_A)", "$$(VAR_A)"),
        ("$(VAR_A", "$(VAR_A"),  # unclosed
        ("$(VAR_A$(VAR_B)", "$(VAR_A$(VAR_B)"),  # the name runs to the first ')': unknown
        ("$VAR_A", "$VAR_A"),
        ("$", "$"),
        ("foo$", "foo$"),
        ("$$", "$"),
        ("$()", "$()"),
        ("${VAR_A}", "${VAR_A}"),
        ("--local-addr=$(VAR_A):$(VAR_B)", "--local-addr=A:B"),
        ("ünïcode $(VAR_A) ü$", "ünïcode A ü$"),
    ],
)
def test_expand_matches_the_kubelet(text: str, want: str) -> None:
    assert nr.expand(text, ENV) == want


# -- env ---------------------------------------------------------------------------------------------

POD = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "x"}},
    "spec": {"nodeName": "runner-0", "hostname": "h", "subdomain": "s"},
}


def _lookup(kind: str, name: str) -> dict[str, str] | None:
    return {
        ("configmap", "cm"): {"KEY": "from-cm", "OTHER": "o", "bad name": "skip"},
        ("secret", "sec"): {"PASSWORD": "hunter2"},
    }.get((kind, name))


def test_build_env_order_expansion_and_refs() -> None:
    container = {
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
        "env": [
            {"name": "A", "value": "a"},
            {"name": "B", "value": "$(A)-$(CM_KEY)-$(LATER)"},
            {"name": "LATER", "value": "late"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "K", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "KEY"}}},
            {"name": "S", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "PASSWORD"}}},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x", "optional": True}}},
            {"name": "LIT", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "REF", "value": "$(LIT)$$(LIT)"},
        ],
    }
    env = nr.build_env(POD, container, "127.0.0.10", "127.0.0.1", _lookup)
    assert env["CM_KEY"] == "from-cm" and env["CM_OTHER"] == "o"
    assert "CM_bad name" not in env
    # Only variables defined *before* are visible; unknown ones stay verbatim.
    assert env["B"] == "a-from-cm-$(LATER)"
    assert (env["POD"], env["NS"], env["NODE"], env["IP"], env["HOST"]) == (
        "p",
        "ns",
        "runner-0",
        "127.0.0.10",
        "127.0.0.1",
    )
    assert env["APP"] == "x" and env["K"] == "from-cm" and env["S"] == "hunter2"
    assert "OPT" not in env
    assert env["REF"] == "p$(LIT)"


@pytest.mark.parametrize(
    "ref",
    [
        {"configMapKeyRef": {"name": "missing", "key": "k"}},
        {"configMapKeyRef": {"name": "cm", "key": "missing"}},
        {"secretKeyRef": {"name": "missing", "key": "k"}},
    ],
)
def test_missing_refs_are_config_errors(ref: dict) -> None:
    container = {"env": [{"name": "X", "valueFrom": ref}]}
    with pytest.raises(nr.ConfigError):
        nr.build_env(POD, container, "127.0.0.10", "127.0.0.1", _lookup)


def test_container_argv_expands_command_and_args() -> None:
    container = {"command": ["sh", "-c"], "args": ["echo $(MY_VAR) $$(MY_VAR) $(NOPE)"]}
    assert nr.container_argv(container, {"MY_VAR": "hi"}) == ["sh", "-c", "echo hi $(MY_VAR) $(NOPE)"]
    assert nr.container_argv({"args": ["python", "-V"]}, {}) == ["python", "-V"]
    assert nr.container_argv({}, {}) == []


def test_process_env_defaults_and_denylist() -> None:
    base = {"PATH": "/bin", "RANK": "3", "TORCHELASTIC_RUN_ID": "x", "KUBECONFIG": "/k", "HOME": "/root"}
    env = nr.process_env({"DS_ACCELERATOR": "cuda", "A": "1"}, base, "host-0", {"OMP_NUM_THREADS": "1"})
    assert env["PATH"] == "/bin" and env["HOME"] == "/root"
    assert "RANK" not in env and "TORCHELASTIC_RUN_ID" not in env and "KUBECONFIG" not in env
    assert env["HOSTNAME"] == "host-0" and env["A"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["DS_ACCELERATOR"] == "cuda"  # the pod's value wins
    assert env["GLOO_SOCKET_IFNAME"] == "lo" and env["PYTHONUNBUFFERED"] == "1"


# -- rewriting -------------------------------------------------------------------------------------


def test_path_rewriter() -> None:
    paths = nr.PathRewriter(
        {"/etc/shardwise": "/tmp/v/layout", "/etc/shardwise/extra/": "/tmp/v/x", "/": "/no"}
    )
    assert paths.rewrite("/etc/shardwise") == "/tmp/v/layout"
    assert paths.rewrite("/etc/shardwise/layout.json") == "/tmp/v/layout/layout.json"
    assert paths.rewrite("/etc/shardwise/extra/a") == "/tmp/v/x/a"  # longest mount wins
    assert paths.rewrite("--layout=/etc/shardwise/layout.json") == "--layout=/tmp/v/layout/layout.json"
    assert paths.rewrite("/etc/shardwise2/x") == "/etc/shardwise2/x"
    assert paths.rewrite("/etc/passwd") == "/etc/passwd"  # a "/" mount is ignored
    assert paths.rewrite("cat /etc/shardwise/layout.json") == "cat /etc/shardwise/layout.json"


PEERS = [
    nr.Peer("ns", "job-node-0", "job", "127.0.0.10"),
    nr.Peer("ns", "job-node-1", "job", "127.0.0.11"),
    nr.Peer("other", "job-node-0", "job", "127.0.0.99"),
    nr.Peer("ns", "noip", "job", ""),
]


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("--rdzv-endpoint=job-node-0.job:29400", "--rdzv-endpoint=127.0.0.10:29400"),
        ("job-node-1.job", "127.0.0.11"),
        ("job-node-1.job.ns", "127.0.0.11"),
        ("job-node-1.job.ns.svc", "127.0.0.11"),
        ("job-node-1.job.ns.svc.cluster.local:80", "127.0.0.11:80"),
        ("http://job-node-0.job.ns.svc.cluster.local/x", "http://127.0.0.10/x"),
        ("a job-node-0.job b job-node-1.job", "a 127.0.0.10 b 127.0.0.11"),
        ("job-node-0.job.other", "job-node-0.job.other"),  # another namespace
        ("job-node-0.jobs", "job-node-0.jobs"),
        ("xjob-node-0.job", "xjob-node-0.job"),
        ("my.job-node-0.job", "my.job-node-0.job"),
        ("job-node-0.job.example.com", "job-node-0.job.example.com"),
        ("job-node-10.job", "job-node-10.job"),
        ("noip.job", "noip.job"),
    ],
)
def test_dns_rewriter(value: str, want: str) -> None:
    assert nr.DnsRewriter("ns", PEERS).rewrite(value) == want


def test_dns_unresolved_names() -> None:
    dns = nr.DnsRewriter("ns", PEERS)
    values = ["--rdzv-endpoint=job-node-2.job:29400", "job-node-0.job", "noip.job.ns.svc", "x.other"]
    assert dns.unresolved(values, {"job"}) == {"job-node-2.job", "noip.job"}
    assert dns.unresolved(values, set()) == set()


# -- status builders -------------------------------------------------------------------------------


def _types(status: dict) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_pod_status_lifecycle() -> None:
    scheduled_at = "2020-01-01T00:00:00Z"
    pod = {
        "metadata": {"name": "p"},
        "status": {
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled_at}]
        },
    }
    run = nr.ContainerRun(name="trainer", image="img")
    pending = nr.pod_status(pod, run, pod_ip="127.0.0.10", host_ip="127.0.0.1", start_time=0, now=100)
    assert pending["phase"] == "Pending"
    assert pending["podIP"] == "127.0.0.10" and pending["podIPs"] == [{"ip": "127.0.0.10"}]
    assert pending["hostIP"] == "127.0.0.1" and pending["hostIPs"] == [{"ip": "127.0.0.1"}]
    assert pending["startTime"] == "1970-01-01T00:00:00Z"
    assert pending["containerStatuses"][0]["state"] == {"waiting": {"reason": "ContainerCreating"}}
    assert _types(pending)["Ready"] == "False"
    scheduled = next(c for c in pending["conditions"] if c["type"] == "PodScheduled")
    assert scheduled["lastTransitionTime"] == scheduled_at  # kept: status unchanged

    run.started_at = 110
    running = nr.pod_status(pod, run, pod_ip="127.0.0.10", host_ip="127.0.0.1", start_time=0, now=111)
    assert running["phase"] == "Running"
    assert running["containerStatuses"][0]["state"] == {"running": {"startedAt": "1970-01-01T00:01:50Z"}}
    assert running["containerStatuses"][0]["ready"] is True
    assert _types(running) == {
        "PodReadyToStartContainers": "True",
        "Initialized": "True",
        "Ready": "True",
        "ContainersReady": "True",
        "PodScheduled": "True",
    }

    run.exit_code, run.finished_at, run.message = 3, 120, "boom"
    failed = nr.pod_status(pod, run, pod_ip="127.0.0.10", host_ip="127.0.0.1", start_time=0, now=121)
    assert failed["phase"] == "Failed"
    terminated = failed["containerStatuses"][0]["state"]["terminated"]
    assert terminated == {
        "exitCode": 3,
        "reason": "Error",
        "startedAt": "1970-01-01T00:01:50Z",
        "finishedAt": "1970-01-01T00:02:00Z",
        "message": "boom",
    }
    assert _types(failed)["Ready"] == "False"
    ready = next(c for c in failed["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "PodCompleted"

    run.exit_code = 0
    done = nr.pod_status(pod, run, pod_ip="127.0.0.10", host_ip="127.0.0.1", start_time=0)
    assert done["phase"] == "Succeeded"
    assert done["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"


def test_exit_codes_and_messages() -> None:
    assert nr.exit_code_of(0) == 0 and nr.exit_code_of(3) == 3
    assert nr.exit_code_of(-15) == 143 and nr.exit_code_of(-9) == 137
    output = b"".join(f"line {i}\n".encode() for i in range(100))
    message = nr.tail_message(output)
    assert message.splitlines() == [f"line {i}" for i in range(80, 100)]
    assert len(nr.tail_message(b"x" * 10000)) == nr.MESSAGE_MAX_BYTES
    assert nr.tail_message("é\n".encode() * 3000).endswith("é")


def test_tail_lines() -> None:
    assert nr.tail_lines(b"a\nb\nc\n", 2) == b"b\nc\n"
    assert nr.tail_lines(b"a\nb\nc", 2) == b"b\nc"
    assert nr.tail_lines(b"a\nb\n", 10) == b"a\nb\n"
    assert nr.tail_lines(b"a\n", 0) == b""


def test_grace_seconds() -> None:
    assert nr.grace_seconds({"metadata": {"deletionGracePeriodSeconds": 5}}, 30) == 5
    assert nr.grace_seconds({"metadata": {}, "spec": {"terminationGracePeriodSeconds": 600}}, 30) == 30
    assert nr.grace_seconds({"metadata": {}, "spec": {}}, 10) == 10
    assert nr.grace_seconds({"metadata": {"deletionGracePeriodSeconds": 0}}, 30) == 0


# -- nodes, leases, IPs -------------------------------------------------------------------------------


def test_node_manifest_is_a_gpu_node_kwok_leaves_alone() -> None:
    shape = nr.NodeShape(
        gpus=2, gpu_product="NVIDIA-A100-SXM4-40GB", gpu_memory_mib=40960, labels=(("a", "b"),)
    )
    node = nr.node_manifest("runner-0", shape, "runner", "127.0.0.1")
    labels = node["metadata"]["labels"]
    assert "annotations" not in node["metadata"]  # no kwok.x-k8s.io/node
    assert labels[nr.RUNNER_LABEL] == "true" and labels["a"] == "b"
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    assert labels["nvidia.com/gpu.memory"] == "40960" and labels["nvidia.com/gpu.count"] == "2"
    assert labels["kubernetes.io/hostname"] == "runner-0"
    status = node["status"]
    assert status["capacity"]["nvidia.com/gpu"] == "2" == status["allocatable"]["nvidia.com/gpu"]
    assert {"cpu", "memory", "pods"} <= set(status["allocatable"])
    assert _types(status)["Ready"] == "True"
    assert {"type": "InternalIP", "address": "127.0.0.1"} in status["addresses"]


def test_node_conditions_keep_transition_time() -> None:
    old = [{"type": "Ready", "status": "True", "lastTransitionTime": "T0"}]
    ready = next(c for c in nr.node_conditions("T1", old) if c["type"] == "Ready")
    assert ready["lastHeartbeatTime"] == "T1" and ready["lastTransitionTime"] == "T0"
    unknown = [{"type": "Ready", "status": "Unknown", "lastTransitionTime": "T0"}]
    ready = next(c for c in nr.node_conditions("T2", unknown) if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "T2"


def test_lease_manifest() -> None:
    lease = nr.lease_manifest("runner-0", "uid-1", 40, now=1.5)
    assert lease["metadata"]["namespace"] == "kube-node-lease"
    assert lease["metadata"]["ownerReferences"][0] == {
        "apiVersion": "v1",
        "kind": "Node",
        "name": "runner-0",
        "uid": "uid-1",
    }
    assert lease["spec"] == {
        "holderIdentity": "runner-0",
        "leaseDurationSeconds": 40,
        "renewTime": "1970-01-01T00:00:01.500000Z",
    }


def test_ip_allocator_round_robin() -> None:
    ips = nr.IpAllocator("127.0.0.254", 4)
    assert ips.allocate("a") == "127.0.0.254"
    assert ips.allocate("a") == "127.0.0.254"  # idempotent per pod
    assert ips.allocate("b") == "127.0.0.255"
    assert ips.allocate("c") == "127.0.1.0"
    ips.release("a")
    assert ips.allocate("d") == "127.0.1.1"  # not the freed one yet
    assert ips.allocate("e") == "127.0.0.254"
    with pytest.raises(RuntimeError):
        ips.allocate("f")
    assert ips.contains("127.0.1.1") and not ips.contains("127.0.1.2") and not ips.contains("127.0.0.253")
    assert not ips.contains("nonsense")
    with pytest.raises(ValueError, match="127"):
        nr.IpAllocator("10.0.0.1", 4)


def test_pod_helpers() -> None:
    started = {"status": {"phase": "Running", "containerStatuses": [{"state": {"running": {}}}]}}
    assert nr.was_started(started) and not nr.is_terminal(started)
    assert not nr.was_started({"status": {"containerStatuses": [{"state": {"waiting": {}}}]}})
    assert nr.is_terminal({"status": {"phase": "Failed"}})
    assert nr.log_path(Path("/s"), "ns", "p") == Path("/s/logs/ns/p.log")
    assert nr.log_path(Path("/s"), "ns", "p", "u") == Path("/s/logs/ns/p_u.log")
