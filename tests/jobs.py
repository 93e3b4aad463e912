"""Test tooling for ParallelTrainingJobs on the local control plane: kubectl, polling, manifests."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
import yaml


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60.0, interval: float = 0.5) -> Any:
    """Poll until probe returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except subprocess.CalledProcessError as exc:
            last = exc.stderr or exc
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class Kubectl:
    """The cluster's own kubectl (same version as its API server) with the cluster's kubeconfig."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [str(self.cluster.kubectl_path), "--kubeconfig", str(self.cluster.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json"))

    def try_json(self, *args: str) -> Any:
        try:
            return self.json(*args)
        except subprocess.CalledProcessError:
            return None

    def apply(self, manifest: dict[str, Any]) -> None:
        self("apply", "-f", "-", stdin=yaml.safe_dump(manifest))

    def job(self, namespace: str, name: str) -> dict[str, Any]:
        """The job; `status` is {} until the operator first writes it, so probes can read it."""
        job = dict(self.json("get", "ptj", name, "-n", namespace))
        job.setdefault("status", {})
        return job

    def pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        items = self.json("get", "pods", "-n", namespace, "-l", f"shardwise.dev/job-name={name}")["items"]
        return sorted(items, key=lambda p: p["metadata"]["name"])

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        items = self.json("get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
        return list(items["items"])

    def exit_pod(self, namespace: str, pod: str, code: int, reason: str | None = None) -> None:
        """End a KWOK pod with an exit code (hack/kwok-stages.yaml), as a kubelet would report it."""
        args = ["annotate", "pod", pod, "-n", namespace, f"kwok.shardwise.dev/exit-code={code}"]
        if reason:
            args.append(f"kwok.shardwise.dev/reason={reason}")
        self(*args)


def install_crd(kubectl: Kubectl, crd_path: str) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", crd_path)
    # The API server compiles the CRD's CEL rules before Established; on 2 busy cores that can
    # take well over a minute, and a slow machine is not a failed install.
    kubectl("wait", "--for=condition=Established", "--timeout=180s", "crd/paralleltrainingjobs.shardwise.dev")


def job_manifest(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """A llama-2-7b job for the KWOK H100 nodes; keyword arguments replace spec sections."""
    body: dict[str, Any] = {
        "model": {"preset": "llama-2-7b"},
        "training": {"method": "full", "precision": "bf16", "sequenceLength": 4096, "globalBatchSize": 16},
        "resources": {"nodes": 2, "gpusPerNode": 8},
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "trainer",
                        "image": "ghcr.io/example/shardwise-trainer:test",
                        "command": ["python", "-m", "shardwise_trainer"],
                        "args": ["--synthetic-data"],
                    }
                ]
            }
        },
    }
    body.update(spec)
    return {
        "apiVersion": "shardwise.dev/v1alpha1",
        "kind": "ParallelTrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def condition(job: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return dict(cond)
    return None


def condition_is(job: dict[str, Any], ctype: str, status: str, reason: str | None = None) -> bool:
    cond = condition(job, ctype)
    return bool(cond and cond["status"] == status and (reason is None or cond["reason"] == reason))
