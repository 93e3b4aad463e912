"""The Helm chart, offline: lint, render, Kubernetes schemas, PSS restricted, RBAC, values schema, CRD drift.

Every scenario is linted and rendered; each rendered manifest is validated against the Kubernetes
1.36 OpenAPI schemas (kubernetes-validate, strict: unknown fields fail) and the operator pod
against the Pod Security Standards "restricted" profile. Helm comes from hack/install-helm.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from tests.chart.chartlib import (
    CHART,
    CLUSTER_WIDE,
    GANG_NAMESPACED,
    KUEUE_CLUSTER_SCOPED,
    KUEUE_NAMESPACED,
    NAMESPACED_PERMISSIONS,
    REPO,
    SCENARIOS,
    SINGLE_NAMESPACE_CLUSTER_ROLE,
    helm,
    helm_path,
    kinds,
    pss_restricted_violations,
    render,
    rule_permissions,
)

pytestmark = pytest.mark.chart

K8S_VERSION = "1.36.0"
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}


@pytest.fixture(scope="module")
def helm_bin() -> str:
    return helm_path()


@pytest.fixture(scope="module")
def rendered(helm_bin: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("values")
    return {name: render(helm_bin, values, tmp_path=tmp) for name, values in SCENARIOS.items()}


def _values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _chart_copy(tmp_path: Path) -> Path:
    chart = tmp_path / "shardwise"
    shutil.copytree(CHART, chart)
    return chart


def _deployment(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = kinds(manifests)["Deployment"]
    return deployment


# --- static files ---------------------------------------------------------------------------------


def test_chart_crd_is_a_byte_identical_copy_of_the_source() -> None:
    source = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    copied = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert copied == source, "charts/shardwise/crds/ must hold exactly the files of crds/"
    for name in source:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"charts/shardwise/crds/{name} differs from crds/{name}: run hack/sync-chart-crd"
        )


def test_every_values_key_is_documented_helm_docs_style() -> None:
    """Each leaf key has a `# --` comment, on itself or on an ancestor documented as a whole."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented: list[str] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    comment: list[str] = []
    key_re = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):(.*)$")
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        if not stripped:
            comment = []
            continue
        match = key_re.match(line)
        if not match:
            continue  # a list item or a continuation
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = bool(comment) and comment[0].startswith("# --")
        inherited = any(doc for _, _, doc in stack)
        following = next((n for n in lines[i + 1 :] if n.strip() and not n.strip().startswith("#")), "")
        child = key_re.match(following)
        is_leaf = match.group(3).strip() != "" or not (child and len(child.group(1)) > indent)
        if is_leaf and not (documented or inherited):
            undocumented.append(".".join([*(k for _, k, _ in stack), key]))
        stack.append((indent, key, documented))
        comment = []
    assert not undocumented, f"values.yaml keys without a `# --` comment: {undocumented}"


def test_values_schema_covers_every_default_key() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict[str, Any], sch: dict[str, Any], path: str) -> Iterator[str]:
        props = sch.get("properties")
        if props is None:
            return
        assert sch.get("additionalProperties") is False, (
            f"{path or '<root>'}: additionalProperties must be false"
        )
        for key, value in node.items():
            if key not in props:
                yield f"{path}{key}"
            elif isinstance(value, dict):
                yield from walk(value, props[key], f"{path}{key}.")

    assert list(walk(values, schema, "")) == []


# --- lint and render ------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_helm_lint_strict(helm_bin: str, tmp_path: Path, scenario: str) -> None:
    result = helm(
        helm_bin, "lint", "--strict", str(CHART), "--values", str(_values_file(tmp_path, SCENARIOS[scenario]))
    )
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_rendered_manifests_validate_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    manifests = rendered[scenario]
    assert manifests
    for manifest in manifests:
        name = f"{manifest['kind']}/{manifest['metadata']['name']}"
        if manifest["kind"] in MONITORING_KINDS:
            continue  # CRDs of the Prometheus Operator: checked structurally below
        try:
            version = kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{scenario}: {name} is invalid for Kubernetes {K8S_VERSION}: {exc.message}")
        assert version == "1.36"
        assert manifest["metadata"].get("namespace") != "" and len(manifest["metadata"]["name"]) <= 63


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_operator_pod_meets_pss_restricted_and_the_chart_rules(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    deployment = _deployment(rendered[scenario])
    spec = deployment["spec"]
    assert spec["replicas"] == 1, "two replicas would both reconcile (standalone kopf, no leader lease)"
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pss_restricted_violations(pod) == []
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["resources"]["requests"].keys() >= {"cpu", "memory"}
    # The only writable path is /tmp, an emptyDir with a size limit; no Secret is mounted.
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert [v for v in pod["volumes"] if "emptyDir" in v] == pod["volumes"]
    assert pod["volumes"][0]["emptyDir"]["sizeLimit"]
    # The liveness probe is kopf's /healthz on the --liveness-port the operator is started with.
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert f"--liveness-port={ports[probe['port']]}" in container["args"]
    assert f"--metrics-port={ports['metrics']}" in container["args"]
    assert container["args"][0] == "operator"
    # kopf's identity comes from getpass.getuser(): $USER keeps it working for any runtime UID.
    assert {"name": "USER", "value": "shardwise"} in container["env"]


def test_the_restricted_check_catches_violations(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pod = copy.deepcopy(_deployment(rendered["default"])["spec"]["template"]["spec"])
    container = pod["containers"][0]
    container["securityContext"]["allowPrivilegeEscalation"] = True
    container["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"], "drop": []}
    del container["securityContext"]["runAsNonRoot"]
    del pod["securityContext"]["runAsNonRoot"]
    pod["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    del container["securityContext"]["seccompProfile"]
    pod["hostNetwork"] = True
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    found = "\n".join(pss_restricted_violations(pod))
    for expected in (
        "allowPrivilegeEscalation",
        "capabilities.add",
        "drop must contain ALL",
        "runAsNonRoot",
        "seccompProfile",
        "hostNetwork",
        "hostPath",
    ):
        assert expected in found, f"{expected!r} not reported in:\n{found}"


def test_default_render_has_the_expected_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    by_kind = kinds(rendered["default"])
    expected = {
        "CustomResourceDefinition": 1,
        "ServiceAccount": 1,
        "ClusterRole": 1,
        "ClusterRoleBinding": 1,
        "Service": 1,
        "Deployment": 1,
    }
    dashboards = len(list((CHART / "dashboards").glob("*.json")))
    if dashboards:
        expected["ConfigMap"] = dashboards  # dashboards.enabled is true by default
    assert {k: len(v) for k, v in by_kind.items()} == expected
    (service,) = by_kind["Service"]
    deployment = _deployment(rendered["default"])
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert (
        container["image"]
        == "shardwise-operator:" + yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    )
    assert not any(a.startswith("--namespace") for a in container["args"])
    (crd,) = by_kind["CustomResourceDefinition"]
    source = yaml.safe_load((REPO / "crds" / "paralleltrainingjobs.shardwise.dev.yaml").read_text())
    assert crd == source


# --- RBAC -----------------------------------------------------------------------------------------


def test_cluster_wide_rbac_is_exactly_the_intended_permissions(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    by_kind = kinds(rendered["default"])
    (role,) = by_kind["ClusterRole"]
    assert rule_permissions(role["rules"]) == CLUSTER_WIDE
    (binding,) = by_kind["ClusterRoleBinding"]
    (sa,) = by_kind["ServiceAccount"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "shardwise-system"}
    ]
    assert "Role" not in by_kind


def test_single_namespace_rbac_is_a_role_plus_the_cluster_scoped_minimum(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    by_kind = kinds(rendered["single-namespace"])
    (cluster_role,) = by_kind["ClusterRole"]
    (role,) = by_kind["Role"]
    (role_binding,) = by_kind["RoleBinding"]
    assert rule_permissions(cluster_role["rules"]) == SINGLE_NAMESPACE_CLUSTER_ROLE
    assert rule_permissions(role["rules"]) == NAMESPACED_PERMISSIONS
    assert role["metadata"]["namespace"] == role_binding["metadata"]["namespace"] == "team-a"
    assert role_binding["subjects"][0]["namespace"] == "shardwise-system"
    args = _deployment(rendered["single-namespace"])["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args


def test_kueue_adds_exactly_the_workload_contract(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (role,) = kinds(rendered["kueue"])["ClusterRole"]
    assert rule_permissions(role["rules"]) == CLUSTER_WIDE | KUEUE_NAMESPACED | KUEUE_CLUSTER_SCOPED
    by_kind = kinds(rendered["kueue-single-namespace"])
    (cluster_role,) = by_kind["ClusterRole"]
    (ns_role,) = by_kind["Role"]
    assert rule_permissions(cluster_role["rules"]) == SINGLE_NAMESPACE_CLUSTER_ROLE | KUEUE_CLUSTER_SCOPED
    assert rule_permissions(ns_role["rules"]) == NAMESPACED_PERMISSIONS | KUEUE_NAMESPACED


def test_gang_scheduling_adds_exactly_the_podgroups(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (role,) = kinds(rendered["gang"])["ClusterRole"]
    assert rule_permissions(role["rules"]) == CLUSTER_WIDE | GANG_NAMESPACED


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_no_access_to_secrets_and_no_secret_objects(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    for manifest in rendered[scenario]:
        assert manifest["kind"] != "Secret"
        for rule in manifest.get("rules") or []:
            assert "secrets" not in rule.get("resources", []), manifest["metadata"]["name"]
            assert "*" not in rule.get("resources", []) + rule.get("verbs", []) + rule.get("apiGroups", [])


def test_rbac_and_service_account_can_be_brought_by_the_user(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    by_kind = kinds(rendered["bring-your-own-sa-and-rbac"])
    assert not by_kind.keys() & {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    assert (
        _deployment(rendered["bring-your-own-sa-and-rbac"])["spec"]["template"]["spec"]["serviceAccountName"]
        == "platform-operator"
    )


# --- monitoring, PDB, switches --------------------------------------------------------------------


def test_service_monitor_scrapes_the_metrics_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    by_kind = kinds(rendered["monitoring"])
    (monitor,) = by_kind["ServiceMonitor"]
    (service,) = by_kind["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["shardwise-system"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert (endpoint["path"], endpoint["interval"], endpoint["scrapeTimeout"]) == ("/metrics", "15s", "10s")
    assert endpoint["relabelings"] and endpoint["metricRelabelings"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def _check_rule_groups(groups: Any) -> None:
    """PrometheusRule CRD structure (RuleGroup: name required; Rule: expr and alert or record)."""
    assert isinstance(groups, list)
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)) and all(names)
    for group in groups:
        assert set(group) <= {
            "name",
            "interval",
            "rules",
            "limit",
            "partial_response_strategy",
            "labels",
            "query_offset",
        }
        for rule in group.get("rules") or []:
            assert "expr" in rule and (("alert" in rule) != ("record" in rule)), rule
            assert set(rule) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def test_prometheus_rule_without_a_rules_file_is_a_marked_placeholder(helm_bin: str, tmp_path: Path) -> None:
    chart = _chart_copy(tmp_path)
    (chart / "files" / "prometheus-rules.yaml").unlink(missing_ok=True)
    manifests = render(helm_bin, {"prometheusRule": {"enabled": True}}, chart=chart, tmp_path=tmp_path)
    (rule,) = kinds(manifests)["PrometheusRule"]
    assert rule["spec"]["groups"] == [{"name": "shardwise-placeholder", "rules": []}]
    raw = helm(helm_bin, "template", "sw", str(chart), "--set", "prometheusRule.enabled=true").stdout
    assert "# PLACEHOLDER: files/prometheus-rules.yaml is not in the chart yet" in raw


def test_prometheus_rule_wraps_the_rules_file(helm_bin: str, tmp_path: Path) -> None:
    chart = _chart_copy(tmp_path)
    rules = {
        "groups": [
            {
                "name": "shardwise.test",
                "rules": [
                    {"record": "shardwise:test:sum", "expr": "sum(shardwise_jobs)"},
                    {
                        "alert": "ShardwiseTest",
                        "expr": "shardwise_jobs > 0",
                        "for": "5m",
                        "labels": {"severity": "warning"},
                        "annotations": {"summary": "{{ $labels.phase }} jobs: {{ $value }}"},
                    },
                ],
            }
        ]
    }
    (chart / "files" / "prometheus-rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    manifests = render(helm_bin, {"prometheusRule": {"enabled": True}}, chart=chart, tmp_path=tmp_path)
    (rule,) = kinds(manifests)["PrometheusRule"]
    assert rule["spec"]["groups"] == rules["groups"]  # Prometheus' {{ $labels }} kept verbatim
    _check_rule_groups(rule["spec"]["groups"])

    (chart / "files" / "prometheus-rules.yaml").write_text("alerts: [oops\n")
    result = helm(helm_bin, "template", "sw", str(chart), "--set", "prometheusRule.enabled=true", check=False)
    assert result.returncode != 0
    assert "must be a Prometheus rules file" in result.stderr


def test_shipped_rules_file_is_wrapped_whole(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (rule,) = kinds(rendered["monitoring"])["PrometheusRule"]
    _check_rule_groups(rule["spec"]["groups"])
    path = CHART / "files" / "prometheus-rules.yaml"
    if path.exists():
        assert rule["spec"]["groups"] == yaml.safe_load(path.read_text())["groups"]


def test_dashboards_become_sidecar_configmaps(helm_bin: str, tmp_path: Path) -> None:
    chart = _chart_copy(tmp_path)
    for old in (chart / "dashboards").glob("*.json"):
        old.unlink()
    dashboard = {"title": "Shardwise test", "uid": "shardwise-test", "panels": [], "schemaVersion": 39}
    (chart / "dashboards" / "Shardwise_Test.json").write_text(json.dumps(dashboard, indent=2))
    (chart / "dashboards" / "jobs.json").write_text(json.dumps({"title": "Jobs", "panels": []}))
    manifests = render(
        helm_bin, {"dashboards": {"enabled": True, "namespace": "monitoring"}}, chart=chart, tmp_path=tmp_path
    )
    maps = {m["metadata"]["name"]: m for m in kinds(manifests)["ConfigMap"]}
    assert set(maps) == {"sw-shardwise-dashboard-shardwise-test", "sw-shardwise-dashboard-jobs"}
    cm = maps["sw-shardwise-dashboard-shardwise-test"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "shardwise"
    assert json.loads(cm["data"]["Shardwise_Test.json"]) == dashboard
    for m in maps.values():
        kubernetes_validate.validate(m, K8S_VERSION, strict=True)

    off = render(helm_bin, {"dashboards": {"enabled": False}}, chart=chart, tmp_path=tmp_path)
    assert "ConfigMap" not in kinds(off)


def test_shipped_dashboards_are_valid_json_configmaps(rendered: dict[str, list[dict[str, Any]]]) -> None:
    shipped = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    maps = kinds(rendered["default"]).get("ConfigMap", [])
    assert sorted(k for m in maps for k in m["data"]) == shipped
    for m in maps:
        for text in m["data"].values():
            assert isinstance(json.loads(text), dict)


def test_pdb_variants(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (pdb,) = kinds(rendered["pdb-max-unavailable"])["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    (pdb,) = kinds(rendered["pdb-min-available"])["PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == "50%" and "maxUnavailable" not in pdb["spec"]
    assert "PodDisruptionBudget" not in kinds(rendered["default"])


def test_network_policy_admits_only_metrics_in_and_the_api_server_and_trainer_stats_out(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    assert "NetworkPolicy" not in kinds(rendered["default"])
    (policy,) = kinds(rendered["network-policy"])["NetworkPolicy"]
    pod_labels = _deployment(rendered["network-policy"])["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8080}]}]
    api, trainers = policy["spec"]["egress"]
    assert api == {"ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]}
    assert trainers == {
        "ports": [{"protocol": "TCP", "port": 9400}],
        "to": [
            {
                "podSelector": {
                    "matchExpressions": [{"key": "shardwise.dev/job-name", "operator": "Exists"}]
                },
                "namespaceSelector": {},
            }
        ],
    }

    (policy,) = kinds(rendered["everything"])["NetworkPolicy"]
    assert policy["spec"]["ingress"] == [
        {
            "ports": [{"protocol": "TCP", "port": 9090}],
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        }
    ]
    api, trainers = policy["spec"]["egress"]
    assert api == {
        "ports": [{"protocol": "TCP", "port": 6443}],
        "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}, {"ipBlock": {"cidr": "fd00::1/128"}}],
    }
    assert trainers["ports"] == [{"protocol": "TCP", "port": 9500}]
    # Watching one namespace, the operator scrapes trainer pods only there.
    assert trainers["to"][0]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "team-b"}
    }


def test_everything_flipped_reaches_the_manifests(rendered: dict[str, list[dict[str, Any]]]) -> None:
    manifests = rendered["everything"]
    by_kind = kinds(manifests)
    deployment = _deployment(manifests)
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert deployment["metadata"]["name"] == "sw-operator"
    assert container["image"] == "registry.example/shardwise-operator@sha256:" + "a" * 64
    assert container["imagePullPolicy"] == "Always"
    assert container["args"] == [
        "operator",
        "--metrics-port=9090",
        "--metrics-address=0.0.0.0",
        "--liveness-port=9091",
        "--workers=2",
        "--stats-max-bytes=4194304",
        "--progress-interval=5",
        "--namespace=team-b",
        "--verbose",
        "--workers=3",
    ]
    assert {"name": "TZ", "value": "UTC"} in container["env"]
    assert pod["spec"]["serviceAccountName"] == "custom-sa"
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-pull"}]
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["spec"]["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["spec"]["affinity"]
    assert pod["metadata"]["annotations"] == {"example.com/a": "b"}
    assert pod["metadata"]["labels"]["team"] == "ml"
    assert pod["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] == "128Mi"
    assert all(
        m["metadata"]["labels"]["cost-center"] == "42"
        for m in manifests
        if m["kind"] != "CustomResourceDefinition"
    )
    (service,) = by_kind["Service"]
    assert service["spec"]["type"] == "NodePort" and service["spec"]["ports"][0]["port"] == 9100
    assert service["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}
    assert {
        "ServiceMonitor",
        "PrometheusRule",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Role",
        "RoleBinding",
    } <= by_kind.keys()
    assert "ConfigMap" not in by_kind


def test_service_monitor_needs_the_service(helm_bin: str) -> None:
    result = helm(
        helm_bin, "template", "sw", str(CHART),
        "--set", "serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false",
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "serviceMonitor.enabled needs metrics.service.enabled" in result.stderr


# --- values.schema.json ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "imagee.tag=1.0"], "imagee"),  # typo'd top-level key
        (["--set", "serviceMonitor.enable=true"], "enable"),  # typo'd nested key
        (["--set", "rbac.namespaced=true"], "namespaced"),  # a key the chart does not have
        (["--set", "operator.workers=eight"], "workers"),  # wrong type
        (["--set", "operator.statsMaxBytes=10"], "statsMaxBytes"),  # below the smallest cap
        (["--set", "operator.progressIntervalSeconds=0"], "progressIntervalSeconds"),  # a write per scrape
        (["--set-string", "dashboards.enabled=yes"], "enabled"),  # string for a boolean
        (["--set", "metrics.port=70000"], "port"),  # out of range
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),  # not in the enum
        (["--set", "watchNamespace=Team_A"], "watchNamespace"),  # not a DNS label
        (["--set", "resources.requests=null"], "requests"),  # requests are required
        (["--set", "tmpSizeLimit=lots"], "tmpSizeLimit"),  # not a quantity
    ],
)
def test_values_schema_rejects(helm_bin: str, args: list[str], message: str) -> None:
    result = helm(helm_bin, "template", "sw", str(CHART), *args, check=False)
    assert result.returncode != 0, f"helm accepted {args}"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_values_schema_accepts_the_documented_forms(helm_bin: str) -> None:
    helm(
        helm_bin, "template", "sw", str(CHART),
        "--set", "podDisruptionBudget.enabled=true", "--set", "podDisruptionBudget.maxUnavailable=25%",
        "--set", "resources.requests.cpu=0.5", "--set", "resources.requests.memory=300Mi",
        "--set", "image.digest=sha256:" + "0" * 64,
    )  # fmt: skip
