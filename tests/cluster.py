"""A throwaway local control plane for integration tests and benchmarks.

`LocalCluster` drives `hack/local-cluster`: it starts etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and KWOK on free loopback ports in its own temporary
state dir (so it never touches a developer's own `.cache/local-cluster` cluster), and stops them
again. Standard library only (no kopf, no kubernetes client), so benchmarks can import it too::

    import sys; sys.path.insert(0, "tests")
    from cluster import LocalCluster

    with LocalCluster(gpu_nodes=100) as cluster:
        cluster.kubectl("get", "nodes")
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "hack" / "local-cluster"
PORTS_PER_CLUSTER = 8  # etcd client, etcd peer, apiserver, controller-manager, scheduler, kwok, Kueue x2
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


class ClusterUnavailableError(RuntimeError):
    """The binaries are not built (or cannot be); the control plane cannot start."""


class ClusterError(RuntimeError):
    """A command against a running cluster failed."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_base(span: int = PORTS_PER_CLUSTER, attempts: int = 50) -> int:
    """A base port with `span` consecutive free loopback ports after it (best effort, racy by nature)."""
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            base: int = sock.getsockname()[1]
        if base + span < 65535 and all(_port_free(base + i) for i in range(span)):
            return base
    raise ClusterError(f"no {span} consecutive free ports found on 127.0.0.1")


def binaries_built() -> bool:
    return subprocess.run([str(SCRIPT), "build", "--check"], capture_output=True, check=False).returncode == 0


def kueue_built() -> bool:
    check = [str(SCRIPT), "build", "--kueue", "--check"]
    return subprocess.run(check, capture_output=True, check=False).returncode == 0


def build_kueue(timeout: float | None = None) -> None:
    """`hack/local-cluster build --kueue` (instant when cached); ClusterUnavailableError if it fails."""
    try:
        result = subprocess.run(
            [str(SCRIPT), "build", "--kueue"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise ClusterUnavailableError(f"hack/local-cluster build --kueue timed out after {timeout}s") from err
    if result.returncode != 0:
        raise ClusterUnavailableError(f"hack/local-cluster build --kueue failed:\n{result.stderr[-4000:]}")


def build_binaries(timeout: float | None = None) -> None:
    """Run `hack/local-cluster build` (instant when cached); ClusterUnavailableError if it fails."""
    try:
        result = subprocess.run(
            [str(SCRIPT), "build"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise ClusterUnavailableError(f"hack/local-cluster build timed out after {timeout}s") from err
    if result.returncode != 0:
        raise ClusterUnavailableError(f"hack/local-cluster build failed:\n{result.stderr[-4000:]}")


class LocalCluster:
    """One control plane in its own state dir on its own ports; `start()` / `stop()` or `with`."""

    def __init__(
        self,
        *,
        gpu_nodes: int = 2,
        gpus_per_node: int = 8,
        gpu_product: str = "NVIDIA-H100-80GB-HBM3",
        gpu_memory_mib: int = 81559,
        state_dir: Path | None = None,
        port_base: int | None = None,
        kueue: bool = False,
    ) -> None:
        self.kueue = kueue
        self.gpu_nodes = gpu_nodes
        self.gpus_per_node = gpus_per_node
        self.gpu_product = gpu_product
        self.gpu_memory_mib = gpu_memory_mib
        self._own_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="shardwise-cluster-"))
        self.port_base = port_base
        self.up_seconds: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def _script(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), *args, "--dir", str(self.state_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def up(self) -> None:
        """`hack/local-cluster up` for this cluster; idempotent (a second call changes nothing)."""
        args = [
            "up",
            f"--gpu-nodes={self.gpu_nodes}",
            f"--gpus-per-node={self.gpus_per_node}",
            f"--gpu-product={self.gpu_product}",
            f"--gpu-memory-mib={self.gpu_memory_mib}",
            f"--port-base={self.port_base}",
            *(["--kueue"] if self.kueue else []),
        ]
        started = time.monotonic()
        result = self._script(*args)
        if result.returncode != 0:
            raise ClusterError(f"hack/local-cluster up failed:\n{result.stderr[-6000:]}")
        self.up_seconds = time.monotonic() - started

    def start(self) -> LocalCluster:
        if not binaries_built():
            build_binaries()
        for attempt in range(3):
            if self.port_base is None or attempt:
                self.port_base = free_port_base()
            try:
                self.up()
                return self
            except ClusterError as err:
                # Another process grabbed one of the ports between the check and the start.
                if "already in use" not in str(err) or attempt == 2:
                    self.stop()
                    raise
                self._script("down")
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop every component (by PID); delete the state dir if this object created it."""
        if self.state_dir.exists():
            result = self._script("down", timeout=120)
            if result.returncode != 0:
                raise ClusterError(f"hack/local-cluster down failed:\n{result.stderr}")
            if self._own_dir:
                shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- facts -----------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def bin_dir(self) -> Path:
        return self.state_dir / "bin"

    @property
    def kubectl_path(self) -> Path:
        """kubectl built from the same Kubernetes release as the server (no version skew)."""
        return self.bin_dir / "kubectl"

    @property
    def server(self) -> str:
        return str(json.loads((self.state_dir / "cluster.json").read_text())["server"])

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG and the cluster's bin dir first on PATH."""
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def pids(self) -> dict[str, int]:
        """PIDs recorded by `up` for each component (whether or not still alive)."""
        out = {}
        for name in COMPONENTS:
            pid_file = self.state_dir / "pids" / f"{name}.pid"
            if pid_file.exists():
                out[name] = int(pid_file.read_text().strip())
        return out

    def logs(self, component: str) -> str:
        return (self.state_dir / "logs" / f"{component}.log").read_text(errors="replace")

    # -- kubectl ---------------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None
    ) -> str:
        """Run kubectl against this cluster; return stdout (ClusterError with stderr on failure)."""
        result = subprocess.run(
            [str(self.kubectl_path), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def apply(self, manifest: dict[str, Any] | str, namespace: str | None = None) -> str:
        body = manifest if isinstance(manifest, str) else json.dumps(manifest)
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=body)

    # -- nodes and identities ----------------------------------------------------------------------

    def add_gpu_nodes(
        self,
        count: int = 1,
        *,
        gpus_per_node: int | None = None,
        gpu_product: str | None = None,
        gpu_memory_mib: int | None = None,
        names: list[str] | None = None,
        prefix: str = "gpu-node",
    ) -> list[str]:
        """Add Ready KWOK GPU nodes (default: this cluster's GPU shape); return their names."""
        args = [
            "add-nodes",
            f"--count={count}",
            f"--gpus-per-node={gpus_per_node or self.gpus_per_node}",
            f"--gpu-product={gpu_product or self.gpu_product}",
            f"--gpu-memory-mib={gpu_memory_mib or self.gpu_memory_mib}",
            f"--node-prefix={prefix}",
        ]
        for name in names or []:
            args.append(f"--name={name}")
        result = self._script(*args)
        if result.returncode != 0:
            raise ClusterError(f"hack/local-cluster add-nodes failed:\n{result.stderr}")
        return result.stdout.split()

    def service_account_kubeconfig(
        self, namespace: str, name: str, *, create: bool = True, duration: str = "1h"
    ) -> Path:
        """A kubeconfig that authenticates as ServiceAccount namespace/name with a bound token."""
        if create:
            self.kubectl("create", "serviceaccount", name, "-n", namespace, check=False)
        token = self.kubectl("create", "token", name, "-n", namespace, f"--duration={duration}").strip()
        path = self.state_dir / f"sa-{namespace}-{name}.kubeconfig"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "local",
                            "cluster": {
                                "server": self.server,
                                "certificate-authority": str(self.state_dir / "pki" / "ca.crt"),
                            },
                        }
                    ],
                    "users": [{"name": name, "user": {"token": token}}],
                    "contexts": [{"name": "sa", "context": {"cluster": "local", "user": name}}],
                    "current-context": "sa",
                }
            )
        )
        path.chmod(0o600)
        return path


def jwt_claims(token: str) -> dict[str, Any]:
    """The (unverified) claims of a JWT, e.g. a ServiceAccount token."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def pid_alive(pid: int) -> bool:
    """True if pid is a live, non-zombie process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
