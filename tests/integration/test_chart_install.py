"""The Helm chart against the real local control plane: install, exact RBAC, a real reconcile, uninstall.

- `helm install` into a namespace that enforces the Pod Security Standards "restricted" profile,
  so the API server itself admits (or refuses) the operator pod. The pod is scheduled onto a KWOK
  GPU node (nodeSelector `shardwise.dev/local-cluster=true`, never a node-runner node) and shown
  Running there without anything running: the image is never pulled.
- With the chart's ServiceAccount token, `kubectl auth can-i --list` must equal the intended
  permissions (tests/chart/chartlib.py) exactly, and Secrets must be denied.
- The operator, run locally as a subprocess with that ServiceAccount's token, must reconcile an
  example job (plan, Service, ConfigMap, pods, status, Events; suspend deletes the pods): the
  RBAC is sufficient, not just small. Its log must hold no 403.
- The same for `watchNamespace` (a Role in one namespace + the cluster-scoped minimum).
- `helm uninstall` leaves no object of the release behind; the CRD stays (Helm never deletes
  crds/).

Helm comes from hack/install-helm; the tests skip if it cannot be installed (fail under CI=true).
"""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.chart.chartlib import (
    CHART,
    CLUSTER_WIDE,
    EVERYONE,
    NAMESPACED_PERMISSIONS,
    SCENARIOS,
    SINGLE_NAMESPACE_CLUSTER_ROLE,
    helm,
    helm_path,
    parse_can_i_list,
    render,
)
from tests.jobs import condition, wait_for
from tests.operator_process import running_operator

pytestmark = [pytest.mark.integration, pytest.mark.chart]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny-cpu.yaml"
CRD_NAME = "paralleltrainingjobs.shardwise.dev"
KWOK_NODES = {"shardwise.dev/local-cluster": "true"}  # hack/local_cluster.py NODE_LABEL
RELEASE = "shardwise"


@dataclass
class Release:
    name: str
    namespace: str
    service_account: str
    installed: bool = True


@pytest.fixture(scope="module")
def helm_bin() -> str:
    return helm_path()


def _restricted_namespace(cluster: Any, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl(
        "label", "namespace", name,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    )  # fmt: skip
    return name


def _install(
    cluster: Any, helm_bin: str, tmp: Path, release: str, *, namespace: str, values: dict[str, Any]
) -> Release:
    values_file = tmp / f"{release}-values.yaml"
    values_file.write_text(yaml.safe_dump({"nodeSelector": KWOK_NODES, **values}))
    helm(
        helm_bin, "install", release, str(CHART),
        "--kubeconfig", str(cluster.kubeconfig), "--namespace", namespace,
        "--values", str(values_file), "--wait", "--timeout", "180s",
    )  # fmt: skip
    return Release(release, namespace, service_account=release)


def _uninstall(cluster: Any, helm_bin: str, release: Release) -> None:
    if release.installed:
        helm(
            helm_bin, "uninstall", release.name, "--kubeconfig", str(cluster.kubeconfig),
            "--namespace", release.namespace, "--wait", "--timeout", "120s",
        )  # fmt: skip
        release.installed = False


@pytest.fixture(scope="module")
def release(cluster: Any, helm_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    namespace = _restricted_namespace(cluster, "sw-chart")
    installed = _install(
        cluster, helm_bin, tmp_path_factory.mktemp("chart"), RELEASE, namespace=namespace,
        values={"networkPolicy": {"enabled": True}},
    )  # fmt: skip
    try:
        yield installed
    finally:
        with contextlib.suppress(AssertionError):
            _uninstall(cluster, helm_bin, installed)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture
def job_namespace(namespace: str) -> str:
    """Where the example jobs go: the shared per-test namespace (the release has its own)."""
    return namespace


def example_job(namespace: str) -> dict[str, Any]:
    """examples/tiny-cpu.yaml, kept on the KWOK GPU nodes (pods shown Running, nothing executed)."""
    job = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    job["metadata"]["namespace"] = namespace
    job["spec"]["resources"]["nodeSelector"] = dict(KWOK_NODES)
    return job


def can_i_list(cluster: Any, kubeconfig: Path, namespace: str) -> set[tuple[str, str]]:
    return parse_can_i_list(
        cluster.kubectl("auth", "can-i", "--list", "-n", namespace, kubeconfig=kubeconfig)
    )


def denied(cluster: Any, kubeconfig: Path, *args: str) -> bool:
    result = subprocess.run(
        [str(cluster.kubectl_path), f"--kubeconfig={kubeconfig}", "auth", "can-i", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 1 and result.stdout.strip() == "no"


def reconcile_example(cluster: Any, kubeconfig: Path, namespace: str, log: Path, *operator_args: str) -> None:
    """Run the operator with kubeconfig; the example job must be planned, get its children, be suspended."""
    job = example_job(namespace)
    name = job["metadata"]["name"]
    with running_operator(kubeconfig, log, *operator_args) as op:
        cluster.apply(job)

        def pods() -> list[dict[str, Any]]:
            out = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"shardwise.dev/job-name={name}")
            return list(out["items"])

        wait_for("the example's 2 pods", lambda: len(pods()) == 2)
        planned = wait_for(
            "Planned=True",
            lambda: (
                (c := condition(cluster.kubectl_json("get", "ptj", name, "-n", namespace), "Planned"))
                and c["status"] == "True"
                and c
            ),
        )
        assert planned["reason"] == "LayoutPlanned"
        status = cluster.kubectl_json("get", "ptj", name, "-n", namespace)["status"]
        assert (status["layout"]["nodes"], status["layout"]["gpusPerNode"]) == (2, 2)
        cluster.kubectl_json("get", "service", name, "-n", namespace)
        cluster.kubectl_json("get", "configmap", f"{name}-layout", "-n", namespace)
        events = cluster.kubectl_json(
            "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}"
        )["items"]
        assert {e["reason"] for e in events} >= {"PodsCreated"}, [e["reason"] for e in events]

        # Suspending deletes the pods: the `delete pods` verb is exercised too.
        cluster.kubectl(
            "patch", "ptj", name, "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"runPolicy": {"suspend": True}}}),
        )  # fmt: skip
        wait_for(
            "the suspended job's pods to be deleted",
            lambda: all(p["metadata"].get("deletionTimestamp") for p in pods()),
        )
        text = op.log()
    assert "Forbidden" not in text and " 403" not in text, text[-6000:]


def leftovers(cluster: Any, release: str) -> list[str]:
    """Every object of any listable type, in any namespace, labelled as the release's."""
    types = cluster.kubectl("api-resources", "--verbs=list", "-o", "name").split()
    out = cluster.kubectl(
        "get",
        ",".join(types),
        "--all-namespaces",
        "-l",
        f"app.kubernetes.io/instance={release}",
        "-o",
        "name",
    )
    return out.split()


# --- tests ------------------------------------------------------------------------------------------


def test_install_creates_the_crd_rbac_deployment_and_services(cluster: Any, release: Release) -> None:
    crd = cluster.kubectl_json("get", "crd", CRD_NAME)
    assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    ns = release.namespace
    cluster.kubectl_json("get", "serviceaccount", release.service_account, "-n", ns)
    role = cluster.kubectl_json("get", "clusterrole", release.name)
    binding = cluster.kubectl_json("get", "clusterrolebinding", release.name)
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": release.service_account, "namespace": ns}
    ]

    deployment = cluster.kubectl_json("get", "deployment", release.name, "-n", ns)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert deployment["status"].get("availableReplicas") == 1
    # Admitted by the namespace's PodSecurity "restricted" enforcement, bound to a KWOK node.
    (pod,) = cluster.kubectl_json(
        "get", "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={release.name}"
    )["items"]
    assert pod["status"]["phase"] == "Running"
    node = cluster.kubectl_json("get", "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"].items() >= KWOK_NODES.items()
    warnings = subprocess.run(
        [str(cluster.kubectl_path), f"--kubeconfig={cluster.kubeconfig}", "label", "--dry-run=server",
         "--overwrite", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted"],
        capture_output=True, text=True, check=True,
    ).stderr  # fmt: skip
    assert "violate" not in warnings, warnings

    service = cluster.kubectl_json("get", "service", f"{release.name}-metrics", "-n", ns)
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("metrics", 8080)]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()

    dashboards = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    maps = cluster.kubectl_json(
        "get", "configmaps", "-n", ns, "-l", f"grafana_dashboard=1,app.kubernetes.io/instance={release.name}"
    )["items"]
    assert sorted(k for m in maps for k in m["data"]) == dashboards

    policy = cluster.kubectl_json("get", "networkpolicy", release.name, "-n", ns)
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert [p["port"] for p in policy["spec"]["ingress"][0]["ports"]] == [8080]


def test_service_account_has_exactly_the_intended_permissions(cluster: Any, release: Release) -> None:
    kubeconfig = cluster.service_account_kubeconfig(release.namespace, release.service_account, create=False)
    for namespace in (release.namespace, "default", "kube-system"):
        assert can_i_list(cluster, kubeconfig, namespace) == CLUSTER_WIDE | EVERYONE, namespace
    for verb in ("get", "list", "watch", "create"):
        assert denied(cluster, kubeconfig, verb, "secrets", "--all-namespaces"), f"{verb} secrets allowed"
    assert denied(cluster, kubeconfig, "get", "secrets", "-n", release.namespace)
    assert denied(cluster, kubeconfig, "delete", "services", "-n", "default")
    assert denied(cluster, kubeconfig, "patch", "paralleltrainingjobs.shardwise.dev", "-n", "default")


def test_operator_with_the_chart_service_account_reconciles_an_example(
    cluster: Any, release: Release, job_namespace: str, tmp_path: Path
) -> None:
    kubeconfig = cluster.service_account_kubeconfig(release.namespace, release.service_account, create=False)
    reconcile_example(cluster, kubeconfig, job_namespace, tmp_path / "operator.log")


def test_single_namespace_mode_role_and_reconcile(
    cluster: Any, helm_bin: str, job_namespace: str, tmp_path: Path
) -> None:
    namespace = _restricted_namespace(cluster, "sw-chart-ns")
    installed = _install(
        cluster,
        helm_bin,
        tmp_path,
        "shardwise-ns",
        namespace=namespace,
        values={"watchNamespace": job_namespace},
    )
    try:
        role = cluster.kubectl_json("get", "role", installed.name, "-n", job_namespace)
        assert role["metadata"]["labels"]["app.kubernetes.io/instance"] == installed.name
        kubeconfig = cluster.service_account_kubeconfig(namespace, installed.service_account, create=False)
        assert can_i_list(cluster, kubeconfig, job_namespace) == (
            NAMESPACED_PERMISSIONS | SINGLE_NAMESPACE_CLUSTER_ROLE | EVERYONE
        )
        assert can_i_list(cluster, kubeconfig, "default") == SINGLE_NAMESPACE_CLUSTER_ROLE | EVERYONE
        assert denied(cluster, kubeconfig, "get", "secrets", "-n", job_namespace)
        assert denied(cluster, kubeconfig, "create", "pods", "-n", "default")
        reconcile_example(
            cluster, kubeconfig, job_namespace, tmp_path / "operator.log", "--namespace", job_namespace
        )
        _uninstall(cluster, helm_bin, installed)
        # ReplicaSets and pods go through the garbage collector, a moment after the Deployment.
        wait_for("no object of the release left", lambda: leftovers(cluster, installed.name) == [])
    finally:
        with contextlib.suppress(AssertionError):
            _uninstall(cluster, helm_bin, installed)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_every_switch_flipped_is_accepted_by_the_api_server(
    cluster: Any, helm_bin: str, job_namespace: str, tmp_path: Path
) -> None:
    """Server-side dry run of the all-switches render (the Prometheus Operator kinds aside: no CRD here)."""
    values = copy.deepcopy(SCENARIOS["everything"])
    values["watchNamespace"] = job_namespace
    values["dashboards"].update(enabled=True, namespace=job_namespace)
    manifests = [
        m
        for m in render(helm_bin, values, namespace=job_namespace, tmp_path=tmp_path)
        if m["kind"] not in {"ServiceMonitor", "PrometheusRule", "CustomResourceDefinition"}
    ]
    assert {"Deployment", "Role", "ClusterRole", "PodDisruptionBudget", "NetworkPolicy", "Service"} <= {
        m["kind"] for m in manifests
    }
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(manifests))
    assert out.count("(server dry run)") == len(manifests), out


def test_uninstall_leaves_no_operator_objects_but_keeps_the_crd(
    cluster: Any, helm_bin: str, release: Release
) -> None:
    assert leftovers(cluster, release.name)  # the release's objects are there before
    _uninstall(cluster, helm_bin, release)
    wait_for("no object of the release left", lambda: leftovers(cluster, release.name) == [], timeout=60)
    for kind in ("clusterrole", "clusterrolebinding"):
        assert cluster.kubectl("get", kind, release.name, check=False) == ""
    # Helm installs crds/ but never upgrades or deletes them: the jobs survive an uninstall.
    cluster.kubectl_json("get", "crd", CRD_NAME)
