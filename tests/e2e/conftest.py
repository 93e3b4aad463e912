"""E2E fixtures: the real local control plane plus the local node runner that executes pods.

`cluster` and `namespace` are re-exported from tests/integration/conftest.py (one control plane
per session for the tests of this directory). `node_runner` starts `hack/node-runner` against it
with 2 nodes x 2 GPUs (labels `shardwise.dev/local-runner=true` and
`shardwise.dev/local-runner-name=<its name>`); `start_node_runner` starts more, with any shape.
Pods bound to a runner's nodes (by the scheduler, e.g. with `node_runner.node_selector`, or by
`spec.nodeName`) really run, as local processes, on their own 127.x.y.z address.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from tests.jobs import Kubectl, install_crd  # noqa: E402
from tests.operator_process import running_operator  # noqa: E402

import integration.conftest as _integration  # noqa: E402
from cluster import LocalCluster  # noqa: E402

# The session's control plane and per-test namespaces, as tests/integration defines them.
cluster = _integration.cluster
namespace = _integration.namespace

NODE_RUNNER = TESTS.parent / "hack" / "node-runner"


@dataclass
class NodeRunner:
    """One `hack/node-runner` process and what tests need to know about it."""

    name: str
    nodes: list[str]
    state_dir: Path
    args: list[str]
    kubeconfig: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)

    @property
    def node_selector(self) -> dict[str, str]:
        """Puts a pod on this runner's nodes (and not on KWOK's or another runner's)."""
        return {"shardwise.dev/local-runner-name": self.name}

    @property
    def log_file(self) -> Path:
        """The runner's own log."""
        return self.state_dir / "node-runner.log"

    def runner_log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def pod_log_path(self, namespace: str, pod: str) -> Path:
        """stdout + stderr of the latest pod of that name (see docs/node-runner.md)."""
        return self.state_dir / "logs" / namespace / f"{pod}.log"

    def pod_log(self, namespace: str, pod: str) -> str:
        path = self.pod_log_path(namespace, pod)
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 90) -> NodeRunner:
        ready = self.state_dir / "ready.json"
        ready.unlink(missing_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(NODE_RUNNER), *self.args, f"--ready-file={ready}"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"node runner exited {self.process.returncode}:\n{self.runner_log()[-4000:]}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"node runner not ready after {timeout:.0f}s:\n{self.runner_log()[-4000:]}"
                )
            time.sleep(0.2)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        """Stop the runner (SIGTERM: graceful; SIGKILL: a crash). Returns its exit code."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


StartNodeRunner = Callable[..., NodeRunner]


@pytest.fixture(scope="session")
def start_node_runner(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartNodeRunner]:
    """Factory: start a node runner against the session's cluster; all are stopped at the end.

    Keyword arguments: nodes, gpus_per_node, gpu_product, gpu_memory_mib, extra_args (list).
    Each runner gets its own name, state dir and a random 127.N.0.10 pod IP base, so runners
    (and a developer's own demo runner) never hand out the same address.
    """
    runners: list[NodeRunner] = []

    def start(
        *,
        nodes: int = 2,
        gpus_per_node: int = 2,
        gpu_product: str = "NVIDIA-H100-80GB-HBM3",
        gpu_memory_mib: int = 81559,
        extra_args: list[str] | None = None,
        cleanup: bool = True,
    ) -> NodeRunner:
        name = f"runner-{uuid.uuid4().hex[:6]}"
        state_dir = tmp_path_factory.mktemp(name)
        args = [
            f"--kubeconfig={cluster.kubeconfig}",
            f"--nodes={nodes}",
            f"--name-prefix={name}",
            f"--gpus-per-node={gpus_per_node}",
            f"--gpu-product={gpu_product}",
            f"--gpu-memory-mib={gpu_memory_mib}",
            f"--state-dir={state_dir}",
            f"--ip-base=127.{random.randint(64, 250)}.0.10",
            # 2 shared cores: one thread per process keeps torch runs lean.
            "--env=OMP_NUM_THREADS=1",
            *(["--cleanup"] if cleanup else []),
            *(extra_args or []),
        ]
        runner = NodeRunner(
            name=name,
            nodes=[f"{name}-{i}" for i in range(nodes)],
            state_dir=state_dir,
            args=args,
            kubeconfig=cluster.kubeconfig,
        )
        runners.append(runner)
        return runner.start()

    yield start
    for runner in runners:
        runner.stop()


@pytest.fixture(scope="session")
def node_runner(start_node_runner: StartNodeRunner) -> NodeRunner:
    """A node runner with 2 nodes x 2 GPUs (H100 80 GB labels), for the whole session."""
    return start_node_runner(nodes=2, gpus_per_node=2)


@pytest.fixture(scope="session")
def shardwise_operator(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The CRD installed and `shardwise operator` running against the session's cluster."""
    install_crd(Kubectl(cluster), str(TESTS.parent / "crds" / "paralleltrainingjobs.shardwise.dev.yaml"))
    log = tmp_path_factory.mktemp("operator-e2e") / "operator.log"
    # Progress written every 2 s (default 30): a tiny job's run shows several writes.
    with running_operator(
        cluster.kubeconfig, log, "--restart-backoff-seconds", "1", "--progress-interval", "2"
    ) as op:
        yield op
    print(op.log()[-20000:])
