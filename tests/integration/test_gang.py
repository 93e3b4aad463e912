"""spec.scheduling.gang on a real API server: the coscheduling PodGroup (CRD from its module), the pods."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from tests.jobs import Kubectl, job_manifest, wait_for
from tests.operator_process import OperatorProcess

from cluster import in_ci

pytestmark = pytest.mark.integration

SCHEDULER_PLUGINS = "sigs.k8s.io/scheduler-plugins@v0.34.7"


@pytest.fixture(scope="module")
def podgroup_crd(kubectl: Kubectl) -> None:
    """scheduler-plugins' PodGroup CRD, from its pinned Go module (the module's own manifests)."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    try:
        out = subprocess.run(
            [go, "mod", "download", "-json", SCHEDULER_PLUGINS],
            capture_output=True, text=True, check=True, timeout=300,
            env={**os.environ, "GOFLAGS": "", "GOWORK": "off"},
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        if in_ci():
            pytest.fail(f"cannot download {SCHEDULER_PLUGINS}: {exc}")
        pytest.skip(f"cannot download {SCHEDULER_PLUGINS}: {exc}")
    crd = Path(json.loads(out.stdout)["Dir"]) / "manifests" / "coscheduling" / "crd.yaml"
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/podgroups.scheduling.x-k8s.io")


def test_a_coscheduling_gang_gets_a_podgroup_of_all_its_pods_and_no_pod_binds_alone(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str, podgroup_crd: None
) -> None:
    job = job_manifest(
        "gang",
        namespace,
        scheduling={"gang": {"kind": "Coscheduling", "scheduleTimeoutSeconds": 60}},
        runPolicy={"scheduleTimeoutSeconds": 0},
    )
    kubectl.apply(job)
    pg = wait_for(
        "the PodGroup",
        lambda: kubectl.try_json("get", "podgroups.scheduling.x-k8s.io", "gang", "-n", namespace),
    )
    assert pg["spec"]["minMember"] == 2
    assert pg["spec"]["minResources"] == {"nvidia.com/gpu": "16"}
    assert pg["spec"]["scheduleTimeoutSeconds"] == 60
    assert pg["metadata"]["ownerReferences"][0]["kind"] == "ParallelTrainingJob"
    pods = wait_for(
        "both pods", lambda: len(kubectl.pods(namespace, "gang")) == 2 and kubectl.pods(namespace, "gang")
    )
    for pod in pods:
        assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
        assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "gang"
    # No coscheduling scheduler runs here: the default scheduler leaves them alone, none binds.
    assert all(not p["spec"].get("nodeName") for p in kubectl.pods(namespace, "gang"))
    kubectl("delete", "ptj", "gang", "-n", namespace, "--wait=false")
