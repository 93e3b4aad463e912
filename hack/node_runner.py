"""The local node runner: a minimal "kubelet" that runs pods as local processes (test / demo tooling).

It registers Node objects with GPU capacity and GPU Feature Discovery labels, keeps them Ready
(Node Lease renewal + Ready condition heartbeat), watches the pods bound to them and runs the
first container of each pod as a local process group on this machine, on its own loopback
address (127.0.0.x), then reports the pod's phase, IP and exit code back to the API server the
way a kubelet does; it also serves the kubelet's log endpoint, so `kubectl logs` works. Not for
production: there is no isolation, no image, no resource limit.
docs/node-runner.md describes it; `hack/node-runner --help` lists its flags.

The module has two halves: pure functions (`$(VAR)` expansion, env building, path and DNS
rewriting, status builders; unit-tested in tests/unit/test_node_runner_pure.py) and the runtime
(`PodWorker`, one per pod; `LogServer`; `NodeRunner`). It talks to the API server through the
operator's own client (shardwise.kube.client: lightkube's kubeconfig and HTTP, the one retry
policy) and imports neither kopf nor torch, nor anything else from the operator package.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import os
import platform
import re
import shutil
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from shardwise.kube.client import Kube, KubeError, WatchExpiredError

log = logging.getLogger("node-runner")

RUNNER_LABEL: Final = "shardwise.dev/local-runner"
RUNNER_NAME_LABEL: Final = "shardwise.dev/local-runner-name"
KWOK_ANNOTATION: Final = "kwok.x-k8s.io/node"
LEASE_NAMESPACE: Final = "kube-node-lease"
GPU_RESOURCE: Final = "nvidia.com/gpu"
DEFAULT_IP_BASE: Final = "127.0.0.10"
DEFAULT_HOST_IP: Final = "127.0.0.1"
KUBELET_VERSION: Final = "v0.0.0-shardwise-node-runner"
# The kubelet caps a termination message at 4096 bytes; FallbackToLogsOnError takes the log tail.
MESSAGE_MAX_BYTES: Final = 4096
DEFAULT_TERMINATION_PATH: Final = "/dev/termination-log"
MESSAGE_MAX_LINES: Final = 20
# Set on every process unless the pod sets them: gloo on the loopback interface, DeepSpeed on CPU
# (no GPU here), and unbuffered Python so the log file shows output as it happens.
PROCESS_DEFAULTS: Final = {"GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
# Never inherited from the runner's own environment: they would leak into every pod (e.g. when
# the runner is started from inside a torchrun worker or a pytest run).
_DENY_ENV_PREFIXES: Final = ("TORCHELASTIC_", "SHARDWISE_", "PYTEST_", "KUBERNETES_")
_DENY_ENV: Final = frozenset(
    {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
     "MASTER_ADDR", "MASTER_PORT", "KUBECONFIG", "HOSTNAME", "CUDA_VISIBLE_DEVICES"}
)  # fmt: skip
_PYTHON_ARGV0 = re.compile(r"^python(\d+(\.\d+)?)?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"


# ================================================================================================
# Pure part: time, $(VAR) expansion, env, rewriting, status builders
# ================================================================================================


def rfc3339(ts: float | None = None) -> str:
    """metav1.Time: second precision, UTC."""
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(ts: float | None = None) -> str:
    """metav1.MicroTime (a Lease's renewTime): microsecond precision, UTC."""
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion, with the kubelet's exact semantics.

    A port of k8s.io/kubernetes third_party/forked/golang/expansion: `$(NAME)` becomes the
    value of NAME when it is defined and stays `$(NAME)` verbatim when it is not; `$$` is an
    escaped `$`; a `$` followed by anything else, or an unclosed `$(`, is kept as written.
    """
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    n = len(text)
    while cursor < n:
        if text[cursor] == "$" and cursor + 1 < n:
            out.append(text[checkpoint:cursor])
            nxt = text[cursor + 1]
            if nxt == "$":
                out.append("$")
                advance = 1
            elif nxt == "(":
                close = text.find(")", cursor + 2)
                if close == -1:
                    out.append("$(")
                    advance = 1
                else:
                    name = text[cursor + 2 : close]
                    out.append(env.get(name, f"$({name})"))
                    advance = close - cursor
            else:
                out.append("$" + nxt)
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


class ConfigError(Exception):
    """A referenced ConfigMap / Secret / key is missing: the kubelet's CreateContainerConfigError."""


Lookup = Callable[[str, str], "Mapping[str, str] | None"]  # (kind, name) -> data, None if absent


def field_ref(pod: Mapping[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    """The downward API values a fieldRef may name (the ones the kubelet supports for env)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f"{k}={json.dumps(str(v))}" for k, v in sorted(items.items()))
    raise ConfigError(f"unsupported fieldRef {path!r}")


def _resource_field(container: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    resource = str(ref.get("resource", ""))
    kind, _, name = resource.partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(name)
    return str(value) if value is not None else "0"


def _key_ref(kind: str, ref: Mapping[str, Any], lookup: Lookup) -> str | None:
    name = str(ref.get("name", ""))
    key = str(ref.get("key", ""))
    data = lookup(kind, name)
    if data is None or key not in data:
        if ref.get("optional"):
            return None
        what = f"{kind} {name!r}" if data is None else f"key {key!r} in {kind} {name!r}"
        raise ConfigError(f"couldn't find {what}")
    return data[key]


def build_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    pod_ip: str,
    host_ip: str,
    lookup: Lookup,
) -> dict[str, str]:
    """The container's env as the kubelet builds it: envFrom, then env in order.

    Plain values are `$(VAR)`-expanded against the variables defined before them (envFrom and
    earlier env entries); valueFrom values are taken literally. Insertion order is kept.
    """
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = str(source.get("prefix", ""))
        for kind, ref_key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            ref = source.get(ref_key)
            if not ref:
                continue
            data = lookup(kind, str(ref.get("name", "")))
            if data is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f"couldn't find {kind} {ref.get('name')!r}")
            for key, value in data.items():
                if _ENV_NAME.match(prefix + key):  # the kubelet skips invalid names too
                    env[prefix + key] = value
    for item in container.get("env") or []:
        name = str(item["name"])
        value_from = item.get("valueFrom")
        if not value_from:
            value = str(item.get("value", ""))
            env[name] = expand(value, env) if value else ""
            continue
        resolved: str | None
        if "fieldRef" in value_from:
            resolved = field_ref(pod, str(value_from["fieldRef"].get("fieldPath", "")), pod_ip, host_ip)
        elif "resourceFieldRef" in value_from:
            resolved = _resource_field(container, value_from["resourceFieldRef"])
        elif "configMapKeyRef" in value_from:
            resolved = _key_ref("configmap", value_from["configMapKeyRef"], lookup)
        elif "secretKeyRef" in value_from:
            resolved = _key_ref("secret", value_from["secretKeyRef"], lookup)
        else:
            raise ConfigError(f"env {name!r}: unsupported valueFrom {sorted(value_from)}")
        if resolved is not None:
            env[name] = resolved
    return env


def container_argv(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args, each `$(VAR)`-expanded. Without a command, the args alone (there is no image
    ENTRYPOINT to fall back to)."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    return [expand(str(a), env) for a in argv]


class PathRewriter:
    """Maps container mount paths to the directories materialized for them on this machine.

    The processes cannot see `/etc/shardwise`, so a value equal to a mountPath, starting with
    `mountPath/`, or of the form `--opt=<such a path>` / `NAME=<such a path>` is rewritten to
    the local directory. Longest mountPath first, so nested mounts win.
    """

    def __init__(self, mounts: Mapping[str, str]) -> None:
        self.mounts = sorted(
            ((mp.rstrip("/"), local) for mp, local in mounts.items() if mp.rstrip("/")),
            key=lambda m: -len(m[0]),
        )

    def _path(self, value: str) -> str | None:
        for mount_path, local in self.mounts:
            if value == mount_path or value.startswith(mount_path + "/"):
                return local + value[len(mount_path) :]
        return None

    def rewrite(self, value: str) -> str:
        direct = self._path(value)
        if direct is not None:
            return direct
        key, sep, rest = value.partition("=")
        if sep:
            inner = self._path(rest)
            if inner is not None:
                return f"{key}={inner}"
        return value


@dataclass(frozen=True)
class Peer:
    """A pod another pod can reach as `<hostname>.<subdomain>` (the headless-Service DNS name)."""

    namespace: str
    hostname: str
    subdomain: str
    ip: str


class DnsRewriter:
    """The runner's DNS substitute: pod DNS names in args / env values become the pod's IP.

    `<hostname>.<subdomain>`, optionally followed by `.<namespace>`, `.<namespace>.svc` or
    `.<namespace>.svc.cluster.local`, of a pod in the same namespace is replaced wherever it
    appears as a whole name (e.g. `--rdzv-endpoint=job-node-0.job:29400` becomes
    `--rdzv-endpoint=127.0.0.10:29400`).
    """

    def __init__(self, namespace: str, peers: Iterable[Peer]) -> None:
        self.namespace = namespace
        self.ips: dict[tuple[str, str], str] = {
            (p.hostname, p.subdomain): p.ip for p in peers if p.namespace == namespace and p.ip
        }
        ns = re.escape(namespace)
        self._suffix = rf"(?:\.{ns}(?:\.svc(?:\.cluster\.local)?)?)?"

    def _pattern(self, names: Iterable[str]) -> re.Pattern[str]:
        alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        # Whole names only: not preceded by a name character, not followed by one or by `.label`.
        return re.compile(
            rf"(?<![A-Za-z0-9_.-])({alternatives}){self._suffix}(?![A-Za-z0-9_-]|\.[A-Za-z0-9])"
        )

    def rewrite(self, value: str) -> str:
        if not self.ips:
            return value
        by_name = {f"{h}.{s}": ip for (h, s), ip in self.ips.items()}
        return self._pattern(by_name).sub(lambda m: by_name[m.group(1)], value)

    def unresolved(self, values: Iterable[str], subdomains: Iterable[str]) -> set[str]:
        """Names `<label>.<subdomain>` (for the given subdomains) naming no known pod yet."""
        subs = set(subdomains)
        if not subs:
            return set()
        pattern = re.compile(
            rf"(?<![A-Za-z0-9_.-])({_DNS_LABEL})\.({'|'.join(re.escape(s) for s in sorted(subs))})"
            rf"{self._suffix}(?![A-Za-z0-9_-]|\.[A-Za-z0-9])"
        )
        missing = set()
        for value in values:
            for match in pattern.finditer(value):
                if (match.group(1), match.group(2)) not in self.ips:
                    missing.add(f"{match.group(1)}.{match.group(2)}")
        return missing


def process_env(
    container_env: Mapping[str, str],
    base: Mapping[str, str],
    hostname: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The process environment: this machine's env (minus leaking variables), HOSTNAME, the
    defaults (GLOO_SOCKET_IFNAME, DS_ACCELERATOR, PYTHONUNBUFFERED), the runner's --env extras,
    then the container env, which wins over all of them."""
    env = {k: v for k, v in base.items() if k not in _DENY_ENV and not k.startswith(_DENY_ENV_PREFIXES)}
    env["HOSTNAME"] = hostname
    for key, value in PROCESS_DEFAULTS.items():
        if key not in container_env:
            env[key] = value
    env.update(extra or {})
    env.update(container_env)
    return env


def tail_message(
    output: bytes, max_lines: int = MESSAGE_MAX_LINES, max_bytes: int = MESSAGE_MAX_BYTES
) -> str:
    """The last lines of a process's output, as a termination message."""
    text = output[-max_bytes:].decode("utf-8", errors="replace")
    lines = text.rstrip("\n").splitlines()[-max_lines:]
    return "\n".join(lines)


def exit_code_of(returncode: int) -> int:
    """A container runtime's exit code: 128 + signal number for a process killed by a signal."""
    return 128 - returncode if returncode < 0 else returncode


def merge_conditions(old: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """New conditions, keeping each one's lastTransitionTime while its status does not change."""
    previous = {c.get("type"): c for c in old or []}
    merged = []
    for cond in new:
        before = previous.get(cond["type"])
        if before and before.get("status") == cond["status"] and before.get("lastTransitionTime"):
            merged.append({**cond, "lastTransitionTime": before["lastTransitionTime"]})
        else:
            merged.append(cond)
    return merged


def _pod_conditions(phase: str, now: str) -> list[dict[str, Any]]:
    """The conditions a kubelet sets for a pod in this phase (no init containers, no probes)."""
    running = phase == "Running"
    done = phase in ("Succeeded", "Failed")
    not_ready = "PodCompleted" if done else "ContainersNotReady"

    def cond(kind: str, status: bool, reason: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": kind,
            "status": "True" if status else "False",
            "lastProbeTime": None,
            "lastTransitionTime": now,
        }
        if reason and not status:
            out["reason"] = reason
        return out

    return [
        cond("PodReadyToStartContainers", not done),
        cond("Initialized", True),
        cond("Ready", running, not_ready),
        cond("ContainersReady", running, not_ready),
        cond("PodScheduled", True),
    ]


@dataclass
class ContainerRun:
    """What the runner knows about the (one) container it runs for a pod."""

    name: str
    image: str = ""
    container_id: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""


def pod_status(
    pod: Mapping[str, Any],
    run: ContainerRun,
    *,
    pod_ip: str,
    host_ip: str,
    start_time: float,
    now: float | None = None,
) -> dict[str, Any]:
    """The pod status a kubelet would report for this container state (Pending / Running /
    Succeeded / Failed), with conditions merged into the pod's current ones."""
    stamp = rfc3339(now)
    state: dict[str, Any]
    if run.exit_code is not None:
        terminated: dict[str, Any] = {
            "exitCode": run.exit_code,
            "reason": run.reason or ("Completed" if run.exit_code == 0 else "Error"),
            "startedAt": rfc3339(run.started_at) if run.started_at else None,
            "finishedAt": rfc3339(run.finished_at) if run.finished_at else stamp,
        }
        if run.message:
            terminated["message"] = run.message
        if run.container_id:
            terminated["containerID"] = run.container_id
        state = {"terminated": terminated}
        phase = "Succeeded" if run.exit_code == 0 else "Failed"
    elif run.started_at is not None:
        state = {"running": {"startedAt": rfc3339(run.started_at)}}
        phase = "Running"
    else:
        waiting: dict[str, Any] = {"reason": run.waiting_reason}
        if run.waiting_message:
            waiting["message"] = run.waiting_message
        state = {"waiting": waiting}
        phase = "Pending"
    container_status: dict[str, Any] = {
        "name": run.name,
        "image": run.image or "node-runner/none",
        "imageID": "",
        "ready": phase == "Running",
        "started": phase == "Running",
        "restartCount": 0,
        "state": state,
    }
    if run.container_id:
        container_status["containerID"] = run.container_id
    current = pod.get("status") or {}
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": merge_conditions(current.get("conditions"), _pod_conditions(phase, stamp)),
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": rfc3339(start_time),
        "containerStatuses": [container_status],
    }
    return status


# ---- nodes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeShape:
    gpus: int = 2
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"
    gpu_memory_mib: int = 81559
    cpu: str = "64"
    memory: str = "256Gi"
    pods: int = 110
    labels: tuple[tuple[str, str], ...] = ()
    taints: tuple[tuple[str, str, str], ...] = ()  # key, value, effect


def node_labels(name: str, shape: NodeShape, runner_name: str) -> dict[str, str]:
    """Well-known labels, the GPU Feature Discovery labels and the runner's own label."""
    return {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "amd64"),
        RUNNER_LABEL: "true",
        RUNNER_NAME_LABEL: runner_name,
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": shape.gpu_product,
        "nvidia.com/gpu.memory": str(shape.gpu_memory_mib),
        "nvidia.com/gpu.count": str(shape.gpus),
        **dict(shape.labels),
    }


def node_resources(shape: NodeShape) -> dict[str, str]:
    return {
        "cpu": shape.cpu,
        "memory": shape.memory,
        "pods": str(shape.pods),
        "ephemeral-storage": "100Gi",
        GPU_RESOURCE: str(shape.gpus),
    }


def node_conditions(now: str, old: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The kubelet's four node conditions, heartbeat `now`; transition times kept while unchanged."""

    def cond(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }

    fresh = [
        cond(
            "MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"
        ),
        cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        cond("Ready", "True", "KubeletReady", "the shardwise local node runner is posting ready status"),
    ]
    return merge_conditions(old, fresh)


def node_status(
    shape: NodeShape,
    host_ip: str,
    name: str,
    now: str,
    old: list[dict[str, Any]] | None,
    *,
    kubelet_port: int = 0,
) -> dict[str, Any]:
    resources = node_resources(shape)
    return {
        "capacity": resources,
        "allocatable": dict(resources),
        "conditions": node_conditions(now, old),
        # InternalIP only: the API server reaches the kubelet API (logs) at the first address of
        # its preferred types (Hostname first), and a node name does not resolve here.
        "addresses": [{"type": "InternalIP", "address": host_ip}],
        # The runner's log server (`kubectl logs`); 0 when it is off.
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "nodeInfo": {
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
            "kernelVersion": platform.release(),
            "osImage": f"shardwise local node runner ({platform.system()})",
            "containerRuntimeVersion": "node-runner://0.1.0",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "amd64"),
        },
    }


def node_manifest(
    name: str, shape: NodeShape, runner_name: str, host_ip: str, kubelet_port: int = 0
) -> dict[str, Any]:
    """A Node as a kubelet registers it. No KWOK annotation: KWOK must leave it alone."""
    spec: dict[str, Any] = {}
    if shape.taints:
        spec["taints"] = [{"key": k, "value": v, "effect": e} for k, v, e in shape.taints]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": node_labels(name, shape, runner_name)},
        "spec": spec,
        "status": node_status(shape, host_ip, name, rfc3339(), None, kubelet_port=kubelet_port),
    }


def lease_manifest(node: str, node_uid: str, duration: int, now: float | None = None) -> dict[str, Any]:
    """The node's Lease in kube-node-lease, owned by the Node (so it goes away with it)."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": node,
            "namespace": LEASE_NAMESPACE,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid}],
        },
        "spec": {"holderIdentity": node, "leaseDurationSeconds": duration, "renewTime": micro_time(now)},
    }


# ---- IP addresses -----------------------------------------------------------------------------


class IpAllocator:
    """Loopback pod IPs, handed out round robin from `base` (so a freed IP is not reused soon)."""

    def __init__(self, base: str, count: int, next_index: int = 0) -> None:
        start = ipaddress.IPv4Address(base)
        if not start.is_loopback or not ipaddress.IPv4Address(int(start) + count - 1).is_loopback:
            raise ValueError(f"--ip-base {base} with {count} addresses leaves 127.0.0.0/8")
        self.base = int(start)
        self.count = count
        self.next_index = next_index % count
        self.used: dict[str, str] = {}  # ip -> pod uid

    def allocate(self, uid: str) -> str:
        for ip, owner in self.used.items():
            if owner == uid:
                return ip
        for _ in range(self.count):
            ip = str(ipaddress.IPv4Address(self.base + self.next_index))
            self.next_index = (self.next_index + 1) % self.count
            if ip not in self.used:
                self.used[ip] = uid
                return ip
        raise RuntimeError(f"all {self.count} pod IPs are in use")

    def contains(self, ip: str) -> bool:
        try:
            return 0 <= int(ipaddress.IPv4Address(ip)) - self.base < self.count
        except ValueError:
            return False

    def reserve(self, ip: str, uid: str) -> None:
        self.used.setdefault(ip, uid)

    def release(self, uid: str) -> None:
        for ip in [ip for ip, owner in self.used.items() if owner == uid]:
            del self.used[ip]


# ---- pods -------------------------------------------------------------------------------------


def is_terminal(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def was_started(pod: Mapping[str, Any]) -> bool:
    """True if some runner already started (or finished) the pod's container."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        state = cs.get("state") or {}
        if "running" in state or "terminated" in state:
            return True
    return False


def pod_key(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def grace_seconds(pod: Mapping[str, Any], cap: float) -> float:
    """How long a deleted pod's processes get between SIGTERM and SIGKILL (capped)."""
    meta = pod.get("metadata") or {}
    grace = meta.get("deletionGracePeriodSeconds")
    if grace is None:
        grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
    return max(0.0, min(float(grace), cap))


def log_path(state_dir: Path, namespace: str, name: str, uid: str | None = None) -> Path:
    """Where a pod's output goes: logs/<namespace>/<pod>.log is the latest pod of that name,
    logs/<namespace>/<pod>_<uid>.log each pod object's own file."""
    folder = state_dir / "logs" / namespace
    return folder / (f"{name}_{uid}.log" if uid else f"{name}.log")


# ================================================================================================
# Runtime: one worker per pod
# ================================================================================================


@dataclass
class Prepared:
    argv: list[str]
    env: dict[str, str]
    cwd: Path


@dataclass
class RunnerConfig:
    kubeconfig: str | None
    state_dir: Path
    nodes: list[str]
    runner_name: str
    shape: NodeShape
    ip_base: str = DEFAULT_IP_BASE
    ip_count: int = 4000
    host_ip: str = DEFAULT_HOST_IP
    lease_duration: int = 40
    lease_interval: float = 10.0
    status_interval: float = 30.0
    max_grace: float = 30.0
    peer_wait: float = 120.0
    python_rewrite: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    cleanup: bool = False
    ready_file: Path | None = None
    log_server: bool = True
    kubelet_port: int = 0


class PodWorker:
    """Runs one pod: IP, volumes, env, process, status reports, termination on deletion."""

    def __init__(self, runner: NodeRunner, pod: dict[str, Any]) -> None:
        self.runner = runner
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.key = f"{self.namespace}/{self.name}"
        containers = (pod.get("spec") or {}).get("containers") or [{}]
        self.container: dict[str, Any] = containers[0]
        self.run = ContainerRun(
            name=self.container.get("name", "main"), image=self.container.get("image", "")
        )
        self.sandbox = runner.cfg.state_dir / "pods" / self.uid
        self.deleted = asyncio.Event()  # deletionTimestamp seen
        self.gone = asyncio.Event()  # the object is gone from the API
        self.changed = asyncio.Event()  # new pod data or peers
        self.proc: asyncio.subprocess.Process | None = None
        self.pod_ip = ""
        self.start_time = time.time()
        self.task: asyncio.Task[None] | None = None
        self.log_file = log_path(runner.cfg.state_dir, self.namespace, self.name, self.uid)

    # -- events from the runner -------------------------------------------------------------------

    def update(self, pod: dict[str, Any]) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleted.set()
        self.changed.set()

    def removed(self) -> None:
        self.gone.set()
        self.deleted.set()
        self.changed.set()

    # -- API helpers --------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"

    async def report(self) -> None:
        """Patch the pod's status from self.run (skipped once the pod is gone)."""
        if self.gone.is_set():
            return
        status = pod_status(
            self.pod,
            self.run,
            pod_ip=self.pod_ip,
            host_ip=self.runner.cfg.host_ip,
            start_time=self.start_time,
        )
        # An API server that is away for a while must not lose a pod's exit: keep trying (the
        # client already retried a few times) until it answers, the pod is gone, or 10 minutes.
        deadline = time.monotonic() + 600
        while True:
            try:
                updated = await self.runner.kube.merge_patch_path(f"{self.path}/status", {"status": status})
                if updated.get("metadata", {}).get("uid") == self.uid:
                    self.pod = updated
                return
            except KubeError as err:
                if err.status == 404:
                    self.gone.set()
                    return
                # Status 0: no answer at all (the client's retries ran out), as transient as a 5xx.
                if 0 < err.status < 500 and err.status != 429:
                    log.warning("Pod %s: status update rejected: %s", self.key, err)
                    return
                problem = err
            if time.monotonic() > deadline or self.gone.is_set():
                log.error("Pod %s: status update failed, giving up: %s", self.key, problem)
                return
            log.warning("Pod %s: status update failed (%s); retrying", self.key, problem)
            await asyncio.sleep(2)

    async def finalize_deletion(self) -> None:
        """What a kubelet does last: delete the pod object with grace period 0."""
        if self.gone.is_set():
            return
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": self.uid},
        }
        try:
            await self.runner.kube.request("DELETE", self.path, body)
            log.info("Pod %s: deleted", self.key)
        except KubeError as err:
            if err.status not in (404, 409):
                log.warning("Pod %s: delete failed: %s", self.key, err)

    # -- preparation --------------------------------------------------------------------------------

    async def _lookup_all(self) -> dict[tuple[str, str], dict[str, str] | None]:
        """Fetch every ConfigMap / Secret the container's env and the pod's volumes name."""
        wanted: set[tuple[str, str]] = set()
        spec = self.pod.get("spec") or {}
        for source in self.container.get("envFrom") or []:
            if source.get("configMapRef"):
                wanted.add(("configmap", source["configMapRef"].get("name", "")))
            if source.get("secretRef"):
                wanted.add(("secret", source["secretRef"].get("name", "")))
        for item in self.container.get("env") or []:
            vf = item.get("valueFrom") or {}
            if vf.get("configMapKeyRef"):
                wanted.add(("configmap", vf["configMapKeyRef"].get("name", "")))
            if vf.get("secretKeyRef"):
                wanted.add(("secret", vf["secretKeyRef"].get("name", "")))
        for vol in spec.get("volumes") or []:
            if vol.get("configMap"):
                wanted.add(("configmap", vol["configMap"].get("name", "")))
            if vol.get("secret"):
                wanted.add(("secret", vol["secret"].get("secretName", "")))
            for source in (vol.get("projected") or {}).get("sources") or []:
                if source.get("configMap"):
                    wanted.add(("configmap", source["configMap"].get("name", "")))
                if source.get("secret"):
                    wanted.add(("secret", source["secret"].get("name", "")))
        found: dict[tuple[str, str], dict[str, str] | None] = {}
        for kind, name in wanted:
            plural = "configmaps" if kind == "configmap" else "secrets"
            obj = await self.runner.kube.get_path(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")
            if obj is None:
                found[(kind, name)] = None
            elif kind == "configmap":
                data = dict(obj.get("data") or {})
                for key, b64 in (obj.get("binaryData") or {}).items():
                    data[key] = base64.b64decode(b64).decode("utf-8", errors="replace")
                found[(kind, name)] = data
            else:
                found[(kind, name)] = {
                    k: base64.b64decode(v).decode("utf-8", errors="replace")
                    for k, v in (obj.get("data") or {}).items()
                }
        return found

    def _write_items(
        self, target: Path, data: Mapping[str, str], source: Mapping[str, Any], what: str
    ) -> None:
        items = source.get("items")
        mode = source.get("defaultMode", 0o644)
        if items:
            for item in items:
                key = item.get("key")
                if key not in data:
                    if source.get("optional"):
                        continue
                    raise ConfigError(f"{what}: no key {key!r}")
                self._write_file(target / item["path"], data[key], item.get("mode", mode))
        else:
            for key, value in data.items():
                self._write_file(target / key, value, mode)

    @staticmethod
    def _write_file(path: Path, content: str, mode: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(mode & 0o777 | 0o600)  # keep it readable by this user whatever the mode says

    def _materialize(self, data: Mapping[tuple[str, str], dict[str, str] | None]) -> dict[str, str]:
        """Create a directory per volume; return mountPath -> local directory for the container."""
        spec = self.pod.get("spec") or {}
        vol_dirs: dict[str, str] = {}
        vol_root = self.sandbox / "volumes"
        for vol in spec.get("volumes") or []:
            name = vol["name"]
            target = vol_root / name
            if vol.get("hostPath"):
                vol_dirs[name] = str(vol["hostPath"].get("path", "/"))
                continue
            if vol.get("persistentVolumeClaim"):
                # A claim outlives pods (checkpoints!): one directory per claim under the state dir.
                claim = vol["persistentVolumeClaim"].get("claimName", name)
                target = self.runner.cfg.state_dir / "volumes" / self.namespace / claim
                target.mkdir(parents=True, exist_ok=True)
                vol_dirs[name] = str(target)
                continue
            target.mkdir(parents=True, exist_ok=True)
            vol_dirs[name] = str(target)
            if vol.get("configMap"):
                src = vol["configMap"]
                cm = data.get(("configmap", src.get("name", "")))
                if cm is None:
                    if not src.get("optional"):
                        raise ConfigError(f"configmap {src.get('name')!r} not found (volume {name!r})")
                    continue
                self._write_items(target, cm, src, f"volume {name!r}")
            elif vol.get("secret"):
                src = vol["secret"]
                secret = data.get(("secret", src.get("secretName", "")))
                if secret is None:
                    if not src.get("optional"):
                        raise ConfigError(f"secret {src.get('secretName')!r} not found (volume {name!r})")
                    continue
                self._write_items(target, secret, src, f"volume {name!r}")
            elif vol.get("downwardAPI"):
                self._downward(target, vol["downwardAPI"].get("items") or [])
            elif vol.get("projected"):
                for source in vol["projected"].get("sources") or []:
                    if source.get("configMap"):
                        cm = data.get(("configmap", source["configMap"].get("name", "")))
                        if cm is not None:
                            self._write_items(target, cm, source["configMap"], f"volume {name!r}")
                    elif source.get("secret"):
                        secret = data.get(("secret", source["secret"].get("name", "")))
                        if secret is not None:
                            self._write_items(target, secret, source["secret"], f"volume {name!r}")
                    elif source.get("downwardAPI"):
                        self._downward(target, source["downwardAPI"].get("items") or [])
                    # serviceAccountToken / clusterTrustBundle: not materialized (no token here).
            # emptyDir and anything else: the empty directory.
        mounts: dict[str, str] = {}
        # The container's terminationMessagePath, as a kubelet mounts it: a file of the sandbox
        # the process may write; its content becomes the termination message (_record_exit).
        self.termination_file.parent.mkdir(parents=True, exist_ok=True)
        self.termination_file.write_bytes(b"")
        mounts[self.termination_path] = str(self.termination_file)
        for mount in self.container.get("volumeMounts") or []:
            local = vol_dirs.get(mount.get("name", ""))
            if local is None:
                continue
            sub = mount.get("subPath")
            mounts[str(mount["mountPath"])] = str(Path(local) / sub) if sub else local
        return mounts

    def _downward(self, target: Path, items: list[dict[str, Any]]) -> None:
        for item in items:
            if item.get("fieldRef"):
                value = field_ref(
                    self.pod, item["fieldRef"].get("fieldPath", ""), self.pod_ip, self.runner.cfg.host_ip
                )
            elif item.get("resourceFieldRef"):
                value = _resource_field(self.container, item["resourceFieldRef"])
            else:
                continue
            self._write_file(target / item["path"], value, item.get("mode", 0o644))

    async def prepare(self) -> Prepared:
        data = await self._lookup_all()
        mounts = self._materialize(data)

        def lookup(kind: str, name: str) -> Mapping[str, str] | None:
            return data.get((kind, name))

        container_env = build_env(self.pod, self.container, self.pod_ip, self.runner.cfg.host_ip, lookup)
        # Env values first, so `$(VAR)` in args picks up rewritten paths (`cat $(FILE)` in sh -c);
        # then the args themselves.
        paths = PathRewriter(mounts)
        container_env = {k: paths.rewrite(v) for k, v in container_env.items()}
        argv = [paths.rewrite(a) for a in container_argv(self.container, container_env)]
        if not argv:
            raise ConfigError("the container has neither command nor args (there is no image to run)")
        spec = self.pod.get("spec") or {}
        hostname = str(spec.get("hostname") or self.name)
        env = process_env(container_env, os.environ, hostname, self.runner.cfg.extra_env)
        if self.runner.cfg.python_rewrite:
            if _PYTHON_ARGV0.match(os.path.basename(argv[0])):
                argv[0] = sys.executable
            # torchrun, pip, ... of the same Python environment first.
            env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        cwd = self.sandbox / "work"
        working_dir = self.container.get("workingDir")
        if working_dir:
            rewritten = Path(paths.rewrite(str(working_dir)))
            if rewritten.is_dir():
                cwd = rewritten
        cwd.mkdir(parents=True, exist_ok=True)
        return Prepared(argv=argv, env=env, cwd=cwd)

    def _resolve_names(self, prepared: Prepared) -> set[str]:
        """Apply the DNS substitute; return the peer names not resolvable yet."""
        dns = DnsRewriter(self.namespace, self.runner.peers())
        values = [*prepared.argv, *prepared.env.values()]
        subdomains = self.runner.subdomains(self.namespace)
        own = (self.pod.get("spec") or {}).get("subdomain")
        if own:
            subdomains.add(own)
        return dns.unresolved(values, subdomains)

    def _apply_dns(self, prepared: Prepared) -> Prepared:
        dns = DnsRewriter(self.namespace, self.runner.peers())
        return Prepared(
            argv=[dns.rewrite(a) for a in prepared.argv],
            env={k: dns.rewrite(v) for k, v in prepared.env.items()},
            cwd=prepared.cwd,
        )

    # -- the pod's life -----------------------------------------------------------------------------

    async def main(self) -> None:
        try:
            await self._main()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Pod %s: worker failed", self.key)

    async def _wait_changed(self, timeout: float) -> None:
        self.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout)

    async def _main(self) -> None:
        if self.deleted.is_set():
            await self.finalize_deletion()
            return
        # Keep the IP an earlier runner instance reported (a pod IP never changes).
        reported = (self.pod.get("status") or {}).get("podIP")
        if reported and self.runner.ips.contains(reported):
            self.runner.ips.reserve(reported, self.uid)
            self.pod_ip = reported
        else:
            self.pod_ip = self.runner.ips.allocate(self.uid)
        self.runner.peer_changed()
        self.sandbox.mkdir(parents=True, exist_ok=True)
        log.info(
            "Pod %s: accepted on node %s, IP %s", self.key, self.pod["spec"].get("nodeName"), self.pod_ip
        )
        await self.report()

        # Prepare (ConfigMaps / Secrets may appear later: retry like the kubelet does).
        prepared: Prepared | None = None
        while prepared is None:
            if self.deleted.is_set():
                await self.finalize_deletion()
                return
            try:
                prepared = await self.prepare()
            except ConfigError as err:
                if self.run.waiting_message != str(err):
                    self.run.waiting_reason, self.run.waiting_message = "CreateContainerConfigError", str(err)
                    log.warning("Pod %s: %s", self.key, err)
                    await self.report()
                await self._wait_changed(2.0)

        # Wait (bounded) until every `<host>.<subdomain>` named in args / env has an IP.
        deadline = time.monotonic() + self.runner.cfg.peer_wait
        while missing := self._resolve_names(prepared):
            if self.deleted.is_set():
                await self.finalize_deletion()
                return
            if time.monotonic() > deadline:
                log.warning("Pod %s: starting with unresolved names %s", self.key, sorted(missing))
                break
            if self.run.waiting_reason != "WaitingForPeers":
                self.run.waiting_reason = "WaitingForPeers"
                self.run.waiting_message = f"waiting for pods {', '.join(sorted(missing))}"
                await self.report()
            await self._wait_changed(1.0)
        prepared = self._apply_dns(prepared)
        if self.deleted.is_set():
            await self.finalize_deletion()
            return

        await self._start(prepared)
        if self.proc is None:  # could not start: already reported Failed
            await self._after_terminal()
            return
        await self.report()

        waiter = asyncio.ensure_future(self.proc.wait())
        deletion = asyncio.ensure_future(self.deleted.wait())
        await asyncio.wait({waiter, deletion}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            deletion.cancel()
            await self.terminate(grace_seconds(self.pod, self.runner.cfg.max_grace), "deleted")
            await self.finalize_deletion()
            return
        deletion.cancel()
        self._record_exit(waiter.result())
        await self.report()
        log.info("Pod %s: exited %s", self.key, self.run.exit_code)
        await self._after_terminal()

    async def _after_terminal(self) -> None:
        """A finished pod stays until it is deleted; finalize a deletion (e.g. with finalizers)."""
        self.runner.ips.release(self.uid)
        self._remove_pid_file()
        await self.deleted.wait()
        await self.finalize_deletion()

    async def _start(self, prepared: Prepared) -> None:
        logs = log_path(self.runner.cfg.state_dir, self.namespace, self.name, self.uid)
        logs.parent.mkdir(parents=True, exist_ok=True)
        latest = log_path(self.runner.cfg.state_dir, self.namespace, self.name)
        with contextlib.suppress(FileNotFoundError):
            latest.unlink()
        latest.symlink_to(logs.name)
        self.log_file = logs
        self.run.started_at = time.time()
        with logs.open("ab") as out:
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *prepared.argv,
                    cwd=str(prepared.cwd),
                    env=prepared.env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # its own process group: killpg reaches torchrun's workers
                )
            except OSError as err:
                # What containerd reports when the entrypoint cannot be executed.
                out.write(f"node-runner: cannot start {prepared.argv[0]!r}: {err}\n".encode())
                self.run.exit_code, self.run.reason = 128, "StartError"
                self.run.message = f"failed to start {prepared.argv[0]!r}: {err}"
                self.run.finished_at = time.time()
                log.warning("Pod %s: %s", self.key, self.run.message)
                await self.report()
                return
        self.run.container_id = f"node-runner://{self.uid}/{self.proc.pid}"
        self._write_pid_file(self.proc.pid)
        log.info(
            "Pod %s: started pid %d: %s",
            self.key,
            self.proc.pid,
            " ".join(prepared.argv).replace("\n", "\\n")[:300],
        )

    @property
    def termination_path(self) -> str:
        return str(self.container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH)

    @property
    def termination_file(self) -> Path:
        return self.sandbox / "termination-log"

    def _record_exit(self, returncode: int) -> None:
        self.run.exit_code = exit_code_of(returncode)
        self.run.finished_at = time.time()
        self.run.reason = "Completed" if self.run.exit_code == 0 else "Error"
        try:  # what the process wrote to its terminationMessagePath wins, as with a kubelet
            written = self.termination_file.read_bytes()[:MESSAGE_MAX_BYTES]
        except OSError:
            written = b""
        if written.strip():
            self.run.message = written.decode("utf-8", errors="replace").rstrip("\n")
            return
        try:
            with self.log_file.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - MESSAGE_MAX_BYTES))
                self.run.message = tail_message(f.read())
        except OSError:
            self.run.message = ""

    async def terminate(self, grace: float, why: str) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        log.info("Pod %s: %s; SIGTERM pid %d (grace %.0fs)", self.key, why, proc.pid, grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            log.info("Pod %s: SIGKILL pid %d", self.key, proc.pid)
        # Kill what is left of the group (children that ignored SIGTERM or outlived the leader).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        self._remove_pid_file()

    async def shutdown(self, grace: float) -> None:
        """The runner is stopping: kill the process and report the pod Failed."""
        if self.proc is None or self.proc.returncode is not None:
            return
        await self.terminate(grace, "node runner stopping")
        self._record_exit(await self.proc.wait())
        self.run.message = (
            self.run.message + "\n" if self.run.message else ""
        ) + "killed: the local node runner stopped"
        await self.report()

    # -- pid files: kill leftovers of a runner that died without cleaning up -------------------------

    def _write_pid_file(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            (self.sandbox / "pid").write_text(f"{pid} {process_start_ticks(pid)}\n")

    def _remove_pid_file(self) -> None:
        with contextlib.suppress(OSError):
            (self.sandbox / "pid").unlink()


def process_start_ticks(pid: int) -> str:
    """The process's start time (field 22 of /proc/<pid>/stat): tells a PID apart from a reuse."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def kill_leftover(pid_file: Path) -> bool:
    """SIGKILL the process group recorded in pid_file if that very process still runs."""
    try:
        pid_text, ticks = pid_file.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    if process_start_ticks(pid) != ticks:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
        return True
    return False


# ================================================================================================
# Runtime: the kubelet log endpoint (kubectl logs)
# ================================================================================================


def tail_lines(data: bytes, lines: int) -> bytes:
    """The last `lines` lines of data (a trailing newline does not count as a line)."""
    if lines <= 0:
        return b""
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts = parts[:-1]
        return b"\n".join(parts[-lines:]) + b"\n"
    return b"\n".join(parts[-lines:])


def self_signed_certificate(directory: Path) -> tuple[Path, Path] | None:
    """A serving certificate for the log endpoint (the API server does not verify it when it has
    no --kubelet-certificate-authority); made once with the openssl command."""
    crt, key = directory / "kubelet-serving.crt", directory / "kubelet-serving.key"
    if crt.exists() and key.exists():
        return crt, key
    openssl = shutil.which("openssl")
    if not openssl:
        return None
    import subprocess  # noqa: PLC0415

    result = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "3650", "-subj", "/CN=shardwise-node-runner", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(crt)],
        capture_output=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        log.warning("openssl failed, no kubectl logs: %s", result.stderr.decode(errors="replace")[-500:])
        return None
    key.chmod(0o600)
    return crt, key


class LogServer:
    """The one piece of the kubelet API the runner serves: GET /containerLogs/<ns>/<pod>/<container>.

    The API server proxies `kubectl logs` to the node's InternalIP at
    daemonEndpoints.kubeletEndpoint.Port; every node of this runner points at this server.
    Supports tailLines, limitBytes and follow (until the process exits); ignores timestamps,
    sinceSeconds and previous (there are no restarts).
    """

    def __init__(self, runner: NodeRunner) -> None:
        self.runner = runner
        self.port = 0
        self._site_runner: Any = None

    async def start(self) -> None:
        from aiohttp import web  # noqa: PLC0415

        cert = self_signed_certificate(self.runner.cfg.state_dir)
        if cert is None:
            return
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self.container_logs)
        app.router.add_get("/healthz", self.healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.runner.cfg.host_ip, self.runner.cfg.kubelet_port, ssl_context=ctx)
        await site.start()
        self._site_runner = runner
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("kubelet log endpoint on https://%s:%d", self.runner.cfg.host_ip, self.port)

    async def healthz(self, _request: Any) -> Any:
        from aiohttp import web  # noqa: PLC0415

        return web.Response(text="ok")

    async def stop(self) -> None:
        if self._site_runner is not None:
            await self._site_runner.cleanup()

    def _worker(self, namespace: str, pod: str) -> PodWorker | None:
        for worker in self.runner.workers.values():
            if worker.namespace == namespace and worker.name == pod:
                return worker
        return None

    async def container_logs(self, request: Any) -> Any:
        from aiohttp import web  # noqa: PLC0415

        namespace, pod = request.match_info["namespace"], request.match_info["pod"]
        path = log_path(self.runner.cfg.state_dir, namespace, pod)
        if not path.exists():
            return web.Response(status=404, text=f"no logs for pod {namespace}/{pod} on this node runner")
        query = request.query
        data = path.read_bytes()
        if "tailLines" in query:
            data = tail_lines(data, int(query["tailLines"]))
        if "limitBytes" in query:
            data = data[: int(query["limitBytes"])]
        if query.get("follow") not in ("true", "1"):
            return web.Response(body=data, content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(data)
        offset = path.stat().st_size
        while True:
            worker = self._worker(namespace, pod)
            running = worker is not None and worker.run.exit_code is None
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            if chunk:
                offset += len(chunk)
                await response.write(chunk)
            elif not running or self.runner.stopping.is_set():
                break
            else:
                await asyncio.sleep(0.2)
        await response.write_eof()
        return response


# ================================================================================================
# Runtime: the runner
# ================================================================================================


class NodeRunner:
    """Registers the nodes, keeps them Ready, and runs the pods bound to them."""

    def __init__(self, cfg: RunnerConfig) -> None:
        self.cfg = cfg
        # The operator's client and retry policy; six attempts, as a kubelet keeps trying longer.
        self.kube = Kube.from_kubeconfig(cfg.kubeconfig, attempts=6, timeout_seconds=30.0)
        self.node_set = set(cfg.nodes)
        self.node_uids: dict[str, str] = {}
        self.workers: dict[str, PodWorker] = {}  # by pod uid
        self.finished: set[str] = set()  # uids handled before (e.g. failed on restart)
        self._peers: dict[str, Peer] = {}  # by pod uid: every pod with hostname + subdomain
        self.ips = IpAllocator(cfg.ip_base, cfg.ip_count, self._load_ip_index())
        self.stopping = asyncio.Event()
        self.logs = LogServer(self)
        self.tasks: list[asyncio.Task[None]] = []
        self.synced = asyncio.Event()

    # -- peers (the DNS substitute's table) ---------------------------------------------------------

    def peers(self) -> list[Peer]:
        """Every pod with hostname + subdomain and an IP; this runner's own IPs win (they are known
        before the API server has them)."""
        out = list(self._peers.values())
        for worker in self.workers.values():
            spec = worker.pod.get("spec") or {}
            if (
                worker.pod_ip
                and worker.run.exit_code is None
                and spec.get("hostname")
                and spec.get("subdomain")
            ):
                out.append(Peer(worker.namespace, spec["hostname"], spec["subdomain"], worker.pod_ip))
        return out

    def subdomains(self, namespace: str) -> set[str]:
        subs = {p.subdomain for p in self._peers.values() if p.namespace == namespace}
        for worker in self.workers.values():
            sub = (worker.pod.get("spec") or {}).get("subdomain")
            if worker.namespace == namespace and sub:
                subs.add(sub)
        return subs

    def peer_changed(self) -> None:
        for worker in self.workers.values():
            worker.changed.set()

    def _track_peer(self, pod: dict[str, Any], deleted: bool) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        uid = meta["uid"]
        ip = (pod.get("status") or {}).get("podIP") or ""
        if deleted or not (spec.get("hostname") and spec.get("subdomain")) or is_terminal(pod):
            if self._peers.pop(uid, None):
                self.peer_changed()
            return
        peer = Peer(meta["namespace"], spec["hostname"], spec["subdomain"], ip)
        if self._peers.get(uid) != peer:
            self._peers[uid] = peer
            self.peer_changed()

    # -- state dir ------------------------------------------------------------------------------------

    def _load_ip_index(self) -> int:
        try:
            return int((self.cfg.state_dir / "next-ip-index").read_text())
        except (OSError, ValueError):
            return 0

    def _save_ip_index(self) -> None:
        with contextlib.suppress(OSError):
            (self.cfg.state_dir / "next-ip-index").write_text(str(self.ips.next_index))

    def _kill_leftovers(self) -> None:
        for pid_file in (self.cfg.state_dir / "pods").glob("*/pid"):
            if kill_leftover(pid_file):
                log.warning("killed leftover process group of pod uid %s", pid_file.parent.name)
            pid_file.unlink(missing_ok=True)

    # -- nodes ------------------------------------------------------------------------------------------

    async def register_nodes(self) -> None:
        for name in self.cfg.nodes:
            manifest = node_manifest(
                name, self.cfg.shape, self.cfg.runner_name, self.cfg.host_ip, self.logs.port
            )
            try:
                node = await self.kube.request("POST", "/api/v1/nodes", manifest)
                log.info(
                    "Node %s: registered (%d x %s)", name, self.cfg.shape.gpus, self.cfg.shape.gpu_product
                )
            except KubeError as err:
                if err.status != 409:
                    raise
                node = await self.kube.request("GET", f"/api/v1/nodes/{name}")
                if KWOK_ANNOTATION in (node["metadata"].get("annotations") or {}):
                    raise SystemExit(
                        f"Node {name} is managed by KWOK ({KWOK_ANNOTATION}); pick another --name-prefix"
                    ) from err
                node = await self.kube.merge_patch_path(
                    f"/api/v1/nodes/{name}", {"metadata": {"labels": manifest["metadata"]["labels"]}}
                )
                log.info("Node %s: taken over (already registered)", name)
            self.node_uids[name] = node["metadata"]["uid"]
            await self.heartbeat_status(name)
            await self.renew_lease(name)

    async def heartbeat_status(self, name: str) -> None:
        node = await self.kube.request("GET", f"/api/v1/nodes/{name}")
        old = (node.get("status") or {}).get("conditions")
        status = node_status(
            self.cfg.shape, self.cfg.host_ip, name, rfc3339(), old, kubelet_port=self.logs.port
        )
        # A merge patch replaces the lists: no stale address survives a takeover.
        await self.kube.merge_patch_path(f"/api/v1/nodes/{name}/status", {"status": status})

    async def renew_lease(self, name: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{name}"
        try:
            await self.kube.merge_patch_path(
                path,
                {
                    "spec": {
                        "holderIdentity": name,
                        "leaseDurationSeconds": self.cfg.lease_duration,
                        "renewTime": micro_time(),
                    }
                },
            )
        except KubeError as err:
            if err.status != 404:
                raise
            await self.kube.request(
                "POST",
                f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases",
                lease_manifest(name, self.node_uids.get(name, ""), self.cfg.lease_duration),
            )

    async def lease_loop(self) -> None:
        while not self.stopping.is_set():
            for name in self.cfg.nodes:
                try:
                    await self.renew_lease(name)
                except Exception as err:
                    log.warning("Node %s: lease renewal failed: %s", name, err)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.cfg.lease_interval)

    async def status_loop(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.cfg.status_interval)
            if self.stopping.is_set():
                return
            for name in self.cfg.nodes:
                try:
                    await self.heartbeat_status(name)
                except KubeError as err:
                    if err.status == 404:  # someone deleted the node: register it again
                        log.warning("Node %s: deleted from the API; registering again", name)
                        with contextlib.suppress(Exception):
                            await self.register_nodes()
                    else:
                        log.warning("Node %s: status heartbeat failed: %s", name, err)
                except Exception as err:
                    log.warning("Node %s: status heartbeat failed: %s", name, err)

    async def wait_nodes_schedulable(self, timeout: float = 60) -> None:
        """Until the node lifecycle controller has removed the not-ready taint from every node."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = []
            for name in self.cfg.nodes:
                node = await self.kube.request("GET", f"/api/v1/nodes/{name}")
                taints = (node.get("spec") or {}).get("taints") or []
                if any(t.get("key", "").startswith("node.kubernetes.io/") for t in taints):
                    pending.append(name)
            if not pending:
                return
            await asyncio.sleep(0.5)
        log.warning("nodes still tainted after %.0fs: %s", timeout, pending)

    async def delete_nodes(self) -> None:
        for name in self.cfg.nodes:
            for path in (
                f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{name}",
                f"/api/v1/nodes/{name}",
            ):
                try:
                    await self.kube.request("DELETE", path, attempts=2, timeout=10)
                except Exception as err:
                    log.debug("delete %s: %s", path, err)
            log.info("Node %s: deleted (--cleanup)", name)

    # -- pods ---------------------------------------------------------------------------------------------

    def _mine(self, pod: dict[str, Any]) -> bool:
        return (pod.get("spec") or {}).get("nodeName") in self.node_set

    async def on_pod(self, kind: str, pod: dict[str, Any], initial: bool = False) -> None:
        self._track_peer(pod, kind == "DELETED")
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker:
                worker.removed()
            self.finished.discard(uid)
            return
        if not self._mine(pod):
            return
        if worker:
            worker.update(pod)
            return
        if uid in self.finished:
            if pod["metadata"].get("deletionTimestamp"):
                self.finished.discard(uid)
                self._spawn(pod)  # finalizes the deletion
            return
        if is_terminal(pod) and not pod["metadata"].get("deletionTimestamp"):
            self.finished.add(uid)
            return
        reported = (pod.get("status") or {}).get("podIP")
        if reported and self.ips.contains(reported):
            self.ips.reserve(reported, uid)  # never hand a live pod's address to another
        if initial and was_started(pod) and not is_terminal(pod):
            # Started by an earlier runner instance whose process is gone: what a kubelet reports
            # for a container it cannot find any more.
            await self._fail_lost(pod)
            self.ips.release(uid)
            self.finished.add(uid)
            if not pod["metadata"].get("deletionTimestamp"):
                return
            self.finished.discard(uid)
        self._spawn(pod)

    def _spawn(self, pod: dict[str, Any]) -> None:
        worker = PodWorker(self, pod)
        worker.update(pod)
        self.workers[worker.uid] = worker
        worker.task = asyncio.create_task(self._run_worker(worker), name=f"pod {worker.key}")

    async def _run_worker(self, worker: PodWorker) -> None:
        try:
            await worker.main()
        finally:
            self.workers.pop(worker.uid, None)
            self.finished.add(worker.uid)
            self.ips.release(worker.uid)
            self._save_ip_index()
            if worker.gone.is_set():
                self.finished.discard(worker.uid)
                shutil.rmtree(worker.sandbox, ignore_errors=True)

    async def _fail_lost(self, pod: dict[str, Any]) -> None:
        status = pod.get("status") or {}
        containers = (pod.get("spec") or {}).get("containers") or [{}]
        run = ContainerRun(name=containers[0].get("name", "main"), image=containers[0].get("image", ""))
        run.exit_code, run.reason = 137, "ContainerStatusUnknown"
        run.message = "The container could not be located: the local node runner restarted while it ran"
        run.started_at = time.time()
        for cs in status.get("containerStatuses") or []:
            started = ((cs.get("state") or {}).get("running") or {}).get("startedAt")
            if started:
                run.started_at = (
                    datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
                )
        start = status.get("startTime")
        start_ts = (
            datetime.strptime(start, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
            if start
            else run.started_at
        )
        body = pod_status(
            pod,
            run,
            pod_ip=status.get("podIP") or self.cfg.ip_base,
            host_ip=self.cfg.host_ip,
            start_time=start_ts,
        )
        meta = pod["metadata"]
        log.warning("Pod %s: lost by a previous runner instance; reporting Failed", pod_key(pod))
        with contextlib.suppress(KubeError):
            await self.kube.merge_patch_path(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", {"status": body}
            )

    async def _relist(self) -> str:
        listing = await self.kube.request("GET", "/api/v1/pods")
        seen = set()
        initial = not self.synced.is_set()
        for pod in listing.get("items") or []:
            seen.add(pod["metadata"]["uid"])
            await self.on_pod("MODIFIED", pod, initial=initial)
        for uid, worker in list(self.workers.items()):
            if uid not in seen:
                worker.removed()
        for uid in list(self._peers):
            if uid not in seen:
                del self._peers[uid]
        if initial:
            # Sandboxes of pods that no longer exist (removed while the runner was down).
            for sandbox in (self.cfg.state_dir / "pods").glob("*"):
                if sandbox.name not in seen:
                    shutil.rmtree(sandbox, ignore_errors=True)
        self.synced.set()
        return str(listing["metadata"]["resourceVersion"])

    async def pod_loop(self) -> None:
        rv: str | None = None
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                if rv is None:
                    rv = await self._relist()
                async for event in self.kube.watch("/api/v1/pods", rv):
                    obj = event.get("object") or {}
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if event.get("type") != "BOOKMARK":
                        await self.on_pod(str(event.get("type")), obj)
                backoff = 0.5
            except WatchExpiredError:
                log.info("pod watch expired; relisting")
                rv = None
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("pod watch failed (%s); retrying in %.1fs", err, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        (self.cfg.state_dir / "pods").mkdir(exist_ok=True)
        self._kill_leftovers()
        try:
            if self.cfg.log_server:
                await self.logs.start()
            await self.register_nodes()
            self.tasks = [
                asyncio.create_task(self.lease_loop(), name="leases"),
                asyncio.create_task(self.status_loop(), name="node status"),
                asyncio.create_task(self.pod_loop(), name="pods"),
            ]
            await self.wait_nodes_schedulable()
            # The first pod list (unless asked to stop first: the API server may be away).
            synced = asyncio.ensure_future(self.synced.wait())
            stopping = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({synced, stopping}, return_when=asyncio.FIRST_COMPLETED)
            synced.cancel()
            stopping.cancel()
            if self.stopping.is_set():
                return
            if self.cfg.ready_file:
                self.cfg.ready_file.write_text(
                    json.dumps({"nodes": self.cfg.nodes, "pid": os.getpid()}) + "\n"
                )
            log.info("ready: nodes %s; state dir %s", ", ".join(self.cfg.nodes), self.cfg.state_dir)
            await self.stopping.wait()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        workers = list(self.workers.values())
        running = [w for w in workers if w.proc is not None and w.proc.returncode is None]
        if running:
            log.info("stopping %d running pod(s)", len(running))
        await asyncio.gather(
            *(w.shutdown(min(self.cfg.max_grace, 10.0)) for w in workers), return_exceptions=True
        )
        for worker in workers:
            if worker.task:
                worker.task.cancel()
        await asyncio.gather(*(w.task for w in workers if w.task), return_exceptions=True)
        self._save_ip_index()
        if self.cfg.cleanup:
            await self.delete_nodes()
        await self.logs.stop()
        await self.kube.close()
        if self.cfg.ready_file:
            self.cfg.ready_file.unlink(missing_ok=True)


# ================================================================================================
# Command line
# ================================================================================================


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _taint(text: str) -> tuple[str, str, str]:
    kv, sep, effect = text.rpartition(":")
    key, _, value = kv.partition("=")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute") or not key:
        raise argparse.ArgumentTypeError(f"expected KEY[=VALUE]:EFFECT, got {text!r}")
    return key, value, effect


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="node-runner",
        description="Run the pods bound to local fake GPU nodes as local processes (test / demo tooling; "
        "see docs/node-runner.md).",
    )
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="default: $KUBECONFIG")
    parser.add_argument("--nodes", type=int, default=2, help="number of nodes to register (default 2)")
    parser.add_argument("--name-prefix", default="runner", help="nodes are <prefix>-0 ... (default runner)")
    parser.add_argument("--gpus-per-node", type=int, default=2)
    parser.add_argument("--gpu-product", default="NVIDIA-H100-80GB-HBM3", help="nvidia.com/gpu.product label")
    parser.add_argument("--gpu-memory-mib", type=int, default=81559, help="nvidia.com/gpu.memory label (MiB)")
    parser.add_argument("--cpu", default="64", help="cpu capacity per node (default 64)")
    parser.add_argument("--memory", default="256Gi", help="memory capacity per node (default 256Gi)")
    parser.add_argument("--max-pods", type=int, default=110)
    parser.add_argument("--label", type=_key_value, action="append", default=[], help="extra node label K=V")
    parser.add_argument("--taint", type=_taint, action="append", default=[], help="node taint K[=V]:EFFECT")
    parser.add_argument(
        "--state-dir", default=None, help="logs, pod sandboxes, claims (default .cache/node-runner/<prefix>)"
    )
    parser.add_argument("--ip-base", default=DEFAULT_IP_BASE, help="first pod IP (default 127.0.0.10)")
    parser.add_argument("--ip-count", type=int, default=4000, help="size of the pod IP range (default 4000)")
    parser.add_argument("--host-ip", default=DEFAULT_HOST_IP, help="the nodes' InternalIP / pods' hostIP")
    parser.add_argument(
        "--env", type=_key_value, action="append", default=[], help="extra env K=V for every pod"
    )
    parser.add_argument(
        "--max-grace-period", type=float, default=30.0, help="cap on SIGTERM -> SIGKILL wait (s)"
    )
    parser.add_argument("--peer-wait", type=float, default=120.0, help="max wait for peers' IPs (s)")
    parser.add_argument("--lease-duration", type=int, default=40)
    parser.add_argument("--lease-interval", type=float, default=10.0, help="lease renewal period (s)")
    parser.add_argument("--status-interval", type=float, default=30.0, help="Ready heartbeat period (s)")
    parser.add_argument("--no-python-rewrite", action="store_true", help="keep argv[0] `python` as written")
    parser.add_argument("--cleanup", action="store_true", help="delete the nodes (and leases) on exit")
    parser.add_argument("--no-log-server", action="store_true", help="no kubelet log endpoint (kubectl logs)")
    parser.add_argument("--kubelet-port", type=int, default=0, help="port of the log endpoint (default: any)")
    parser.add_argument("--ready-file", default=None, help="written once nodes are Ready and pods synced")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RunnerConfig:
    state_dir = Path(args.state_dir or Path(".cache") / "node-runner" / args.name_prefix).resolve()
    return RunnerConfig(
        kubeconfig=args.kubeconfig,
        state_dir=state_dir,
        nodes=[f"{args.name_prefix}-{i}" for i in range(args.nodes)],
        runner_name=args.name_prefix,
        shape=NodeShape(
            gpus=args.gpus_per_node,
            gpu_product=args.gpu_product,
            gpu_memory_mib=args.gpu_memory_mib,
            cpu=args.cpu,
            memory=args.memory,
            pods=args.max_pods,
            labels=tuple(args.label),
            taints=tuple(args.taint),
        ),
        ip_base=args.ip_base,
        ip_count=args.ip_count,
        host_ip=args.host_ip,
        lease_duration=args.lease_duration,
        lease_interval=args.lease_interval,
        status_interval=args.status_interval,
        max_grace=args.max_grace_period,
        peer_wait=args.peer_wait,
        python_rewrite=not args.no_python_rewrite,
        extra_env=dict(args.env),
        cleanup=args.cleanup,
        log_server=not args.no_log_server,
        kubelet_port=args.kubelet_port,
        ready_file=Path(args.ready_file) if args.ready_file else None,
    )


async def _amain(cfg: RunnerConfig) -> None:
    runner = NodeRunner(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.stopping.set)
    await runner.run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s node-runner: %(message)s",
    )
    cfg = config_from_args(args)
    try:
        asyncio.run(_amain(cfg))
    except SystemExit as err:
        if isinstance(err.code, str):
            log.error("%s", err.code)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
