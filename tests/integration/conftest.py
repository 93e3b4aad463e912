"""Integration-test fixtures: one real local control plane per test session.

The `cluster` fixture starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
KWOK (2 fake nodes x 8 H100 GPUs) on free loopback ports in a temporary state dir through
`hack/local-cluster`, and stops them when the session ends, so tests never collide with a
developer's own cluster (`.cache/local-cluster`).

If the binaries are missing or cannot be built, the fixture fails under CI (`CI=true`) and skips
locally with the command to run; if they exist but the control plane does not start, it fails.
Locally a missing cache is not built from inside pytest (a cold build is far longer than the
test timeout) unless SHARDWISE_BUILD_CLUSTER=1.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.jobs import Kubectl, install_crd
from tests.operator_process import OperatorProcess, running_operator

from cluster import (
    ClusterError,
    ClusterUnavailableError,
    LocalCluster,
    binaries_built,
    build_binaries,
    in_ci,
)

REPO = Path(__file__).resolve().parents[2]


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"local control plane unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"local control plane unavailable: {reason}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    if not binaries_built():
        if not in_ci() and os.environ.get("SHARDWISE_BUILD_CLUSTER") != "1":
            _unavailable(
                "binaries not built; run `hack/local-cluster build` once (a cold build takes tens of "
                "minutes, later ones are instant), or set SHARDWISE_BUILD_CLUSTER=1"
            )
        try:
            build_binaries()
        except ClusterUnavailableError as err:
            _unavailable(str(err))
    local = LocalCluster()
    try:
        local.start()
    except ClusterUnavailableError as err:
        _unavailable(str(err))
    except ClusterError as err:
        # The binaries exist but the control plane did not come up: a real failure, never a skip.
        pytest.fail(f"local control plane failed to start: {err}", pytrace=False)
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    """A fresh namespace, deleted (with everything in it) after the test."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    # Not waited for: namespace deletion (finalizers, garbage collection) runs in the background.
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def kubectl(cluster: LocalCluster) -> Kubectl:
    """The cluster's kubectl with the ParallelTrainingJob CRD installed and Established."""
    k = Kubectl(cluster)
    install_crd(
        k, str(Path(__file__).resolve().parents[2] / "crds" / "paralleltrainingjobs.shardwise.dev.yaml")
    )
    return k


@pytest.fixture(scope="module")
def operator(
    cluster: LocalCluster, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """`shardwise operator` for one test module (short restart backoff); its log printed at the end.

    Module-scoped on purpose: a module that runs an operator of its own (the chaos test, the
    chart's ServiceAccount test) never has a second one acting on its jobs.
    """
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with running_operator(cluster.kubeconfig, log, "--restart-backoff-seconds", "1") as op:
        yield op
    print(op.log()[-20000:])
