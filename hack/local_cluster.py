#!/usr/bin/env python3
"""Build, start and stop shardwise's local Kubernetes control plane (`hack/local-cluster`).

Real components only, all on 127.0.0.1:

* etcd (built from go.etcd.io/etcd/server/v3, the version k8s.io/kubernetes pins),
* kube-apiserver, kube-controller-manager, kube-scheduler and a matching kubectl, built from
  the k8s.io/kubernetes Go module pinned in hack/tools/go.mod,
* KWOK (`go install sigs.k8s.io/kwok/cmd/kwok@<tag>`), which plays the kubelet of the fake GPU
  nodes: it keeps their leases fresh and moves pods bound to them to Running.
* optionally (`up --kueue`) Kueue's controller manager (`go install sigs.k8s.io/kueue/cmd/kueue@<tag>`),
  out of cluster, with its CRDs from the same module and its webhooks served on loopback with a
  certificate this script issues, registered by URL.

Binaries are built once per user and version into
``${SHARDWISE_K8S_CACHE:-${XDG_CACHE_HOME:-~/.cache}/shardwise}/<versions>/bin`` and symlinked into
``.cache/local-cluster/bin``; a fresh clone on the same machine therefore does not rebuild.

Standard library only, so CI can run it before anything else is installed. See
docs/local-cluster.md for what runs where and how pods on the fake nodes behave.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOOLS_DIR = REPO / "hack" / "tools"
SHARDWISE_STAGES = REPO / "hack" / "kwok-stages.yaml"
DEFAULT_STATE_DIR = REPO / ".cache" / "local-cluster"

KWOK_VERSION = "v0.8.0"  # supports Kubernetes 1.27 - 1.36 (its supported_releases.txt)
KUEUE_VERSION = "v0.17.0"  # built against k8s.io v0.35; talks to the 1.36 control plane
# The ParallelTrainingJob as Kueue names an external framework (Kind.version.group).
KUEUE_EXTERNAL_FRAMEWORK = "ParallelTrainingJob.v1alpha1.shardwise.dev"
DEFAULT_PORT_BASE = 17100
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"  # KWOK hands out fake pod IPs from here
NODE_LABEL = "shardwise.dev/local-cluster"  # marks the fake GPU nodes this script created
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
# Upstream KWOK stages copied from the pinned module at build time (kustomize/stage/...).
KWOK_STAGE_FILES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-complete.yaml",
    "pod/fast/pod-delete.yaml",
)
K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
ALL_BINARIES = (*K8S_BINARIES, "etcd", "kwok")
# Start order; `down` stops in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
PORT_OFFSETS = {
    "etcd": 0,
    "etcd-peer": 1,
    "kube-apiserver": 2,
    "kube-controller-manager": 3,
    "kube-scheduler": 4,
    "kwok": 5,
    "kueue-webhook": 6,
    "kueue": 7,  # health probes
}


class ClusterError(RuntimeError):
    """A failure the user can act on; printed without a traceback."""


def log(msg: str) -> None:
    print(f"[local-cluster] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Versions and the build cache
# --------------------------------------------------------------------------------------------


def _go_mod_version(module: str) -> str:
    text = (TOOLS_DIR / "go.mod").read_text()
    match = re.search(rf"^\s*{re.escape(module)} (v\S+)", text, re.MULTILINE)
    if not match:
        raise ClusterError(f"{module} is not required in {TOOLS_DIR / 'go.mod'}")
    return match.group(1)


def versions() -> dict[str, str]:
    return {
        "kubernetes": _go_mod_version("k8s.io/kubernetes"),
        "etcd": _go_mod_version("go.etcd.io/etcd/server/v3"),
        "kwok": KWOK_VERSION,
    }


def go_binary() -> str:
    if os.environ.get("GO"):
        if shutil.which(os.environ["GO"]):
            return os.environ["GO"]
        raise ClusterError(f"GO={os.environ['GO']} is not an executable Go toolchain")
    found = shutil.which("go")
    if found:
        return found
    if Path("/usr/local/go/bin/go").exists():
        return "/usr/local/go/bin/go"
    raise ClusterError("Go toolchain not found: install Go >= 1.26 or set GO=/path/to/go")


def cache_root() -> Path:
    if os.environ.get("SHARDWISE_K8S_CACHE"):
        return Path(os.environ["SHARDWISE_K8S_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "shardwise"


def build_key() -> str:
    """Cache key: the pinned versions plus a digest of the tools module (go.mod sans comments, go.sum)."""
    v = versions()
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        # Comments do not change what gets built; do not let them invalidate the cache.
        lines = (TOOLS_DIR / name).read_text().splitlines()
        digest.update("\n".join(ln for ln in lines if not ln.lstrip().startswith("//")).encode())
    return f"k8s-{v['kubernetes']}_etcd-{v['etcd']}_kwok-{v['kwok']}_{digest.hexdigest()[:10]}"


def cached_bin_dir() -> Path:
    return cache_root() / build_key() / "bin"


def binaries_present(bin_dir: Path) -> bool:
    return (bin_dir / "BUILD-OK").exists() and all(os.access(bin_dir / b, os.X_OK) for b in ALL_BINARIES)


def _ldflags(k8s_version: str) -> str:
    # Without these the binaries report v0.0.0-master; kubectl and clients read /version.
    major, minor = k8s_version.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={k8s_version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return " ".join(flags)


def _run_go(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    log("$ go " + " ".join(args))
    result = subprocess.run([go_binary(), *args], cwd=cwd, env=env, check=False)
    if result.returncode != 0:
        raise ClusterError(f"go {args[0]} failed (exit {result.returncode}); see output above")


def build(force: bool = False) -> Path:
    """Build (or reuse) the binaries; return the per-user cache bin dir. Safe to run concurrently."""
    bin_dir = cached_bin_dir()
    if not force and binaries_present(bin_dir):
        link_bin_dir(bin_dir, DEFAULT_STATE_DIR)
        return bin_dir
    bin_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(bin_dir.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent build of the same key waits, then reuses
        if not force and binaries_present(bin_dir):
            link_bin_dir(bin_dir, DEFAULT_STATE_DIR)
            return bin_dir
        v = versions()
        jobs = os.environ.get("SHARDWISE_BUILD_JOBS", str(os.cpu_count() or 2))
        env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": f"-p={jobs} -buildvcs=false -trimpath"}
        partial = Path(tempfile.mkdtemp(prefix="bin.partial-", dir=bin_dir.parent))
        started = time.monotonic()
        log(f"building Kubernetes {v['kubernetes']}, etcd {v['etcd']}, KWOK {v['kwok']} into {bin_dir}")
        log("a cold build takes a while on a small machine (see benchmarks/results/local-cluster-build.md)")
        _run_go(
            ["build", "-ldflags", _ldflags(v["kubernetes"]), "-o", f"{partial}/"]
            + [f"k8s.io/kubernetes/cmd/{b}" for b in K8S_BINARIES],
            TOOLS_DIR,
            env,
        )
        _run_go(
            ["build", "-ldflags", "-s -w", "-o", str(partial / "etcd"), "go.etcd.io/etcd/server/v3"],
            TOOLS_DIR,
            env,
        )
        # KWOK is installed from its own module (its go.mod, its go.sum), as upstream documents.
        _run_go(
            ["install", "-ldflags", "-s -w", f"sigs.k8s.io/kwok/cmd/kwok@{v['kwok']}"],
            partial,
            {**env, "GOBIN": str(partial), "GOWORK": "off"},
        )
        _copy_kwok_stages(partial / "kwok-stages", env)
        (partial / "BUILD-OK").write_text(json.dumps({**v, "seconds": round(time.monotonic() - started)}))
        if bin_dir.exists():
            shutil.rmtree(bin_dir)
        partial.rename(bin_dir)
        log(f"built in {time.monotonic() - started:.0f}s")
    link_bin_dir(bin_dir, DEFAULT_STATE_DIR)
    return bin_dir


def _copy_kwok_stages(dest: Path, env: dict[str, str]) -> None:
    out = subprocess.run(
        [go_binary(), "mod", "download", "-json", f"sigs.k8s.io/kwok@{KWOK_VERSION}"],
        cwd=dest.parent,
        env={**env, "GOWORK": "off", "GOFLAGS": ""},
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise ClusterError(f"go mod download sigs.k8s.io/kwok failed: {out.stderr or out.stdout}")
    source = Path(json.loads(out.stdout)["Dir"]) / "kustomize" / "stage"
    dest.mkdir(parents=True, exist_ok=True)
    for rel in KWOK_STAGE_FILES:
        shutil.copyfile(source / rel, dest / Path(rel).name)


def _rmtree_writable(path: Path) -> None:
    """Remove a copy of a module-cache tree (read-only files and directories)."""
    for sub in (path, *path.rglob("*")):
        if sub.is_dir() and not sub.is_symlink():
            sub.chmod(0o755)
    shutil.rmtree(path)


def kueue_dir() -> Path:
    """Kueue's cache: bin/kueue, its CRDs and webhook manifests, keyed by the pinned version."""
    return cache_root() / f"kueue-{KUEUE_VERSION}"


def kueue_present() -> bool:
    d = kueue_dir()
    return (d / "BUILD-OK").exists() and os.access(d / "bin" / "kueue", os.X_OK)


def build_kueue(force: bool = False) -> Path:
    """Build (or reuse) Kueue's manager from its module at the pinned version (one patch, below)."""
    d = kueue_dir()
    if not force and kueue_present():
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.parent / ".kueue.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and kueue_present():
            return d
        jobs = os.environ.get("SHARDWISE_BUILD_JOBS", str(os.cpu_count() or 2))
        env = {
            **os.environ, "CGO_ENABLED": "0", "GOWORK": "off",
            "GOFLAGS": f"-p={jobs} -buildvcs=false -trimpath",
        }  # fmt: skip
        partial = Path(tempfile.mkdtemp(prefix="kueue.partial-", dir=d.parent))
        started = time.monotonic()
        log(f"building Kueue {KUEUE_VERSION} into {d}")
        out = subprocess.run(
            [go_binary(), "mod", "download", "-json", f"sigs.k8s.io/kueue@{KUEUE_VERSION}"],
            cwd=partial, env={**env, "GOFLAGS": ""}, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise ClusterError(f"go mod download sigs.k8s.io/kueue failed: {out.stderr or out.stdout}")
        module = Path(json.loads(out.stdout)["Dir"])
        # Built inside a copy of its module (its own go.mod and go.sum), with one patch: with
        # internalCertManagement off, main.go reads the metrics certificate from a fixed
        # /etc/kueue/metrics/certs; out of cluster it comes from KUEUE_METRICS_CERT_DIR.
        src = partial / "src"
        skip = {"test", "site", "keps", "charts", "cmd/kueueviz"}  # not part of the manager
        shutil.copytree(
            module,
            src,
            ignore=lambda d, names: [n for n in names if os.path.relpath(Path(d) / n, module) in skip],
        )
        main_go = src / "cmd" / "kueue" / "main.go"
        text = main_go.read_text()
        fixed = 'metricsCertPath := "/etc/kueue/metrics/certs"'
        if fixed not in text:
            raise ClusterError(
                f"Kueue {KUEUE_VERSION}: {fixed!r} not found in cmd/kueue/main.go; revisit the patch"
            )
        for path in (src, src / "cmd", src / "cmd" / "kueue", main_go):
            path.chmod(0o755 if path.is_dir() else 0o644)
        main_go.write_text(text.replace(fixed, 'metricsCertPath := os.Getenv("KUEUE_METRICS_CERT_DIR")'))
        _run_go(
            ["build", "-mod=mod", "-ldflags", "-s -w", "-o", str(partial / "bin" / "kueue"), "./cmd/kueue"],
            src,
            env,
        )
        shutil.copytree(module / "config" / "components" / "crd" / "bases", partial / "crds")
        shutil.copyfile(
            module / "config" / "components" / "webhook" / "manifests.yaml", partial / "webhooks.yaml"
        )
        seconds = round(time.monotonic() - started)
        (partial / "BUILD-OK").write_text(json.dumps({"kueue": KUEUE_VERSION, "seconds": seconds}))
        _rmtree_writable(src)
        if d.exists():
            shutil.rmtree(d)
        partial.rename(d)
        log(f"built Kueue in {seconds}s")
    return d


def link_bin_dir(bin_dir: Path, state_dir: Path) -> Path:
    """Point <state>/bin at the per-user cache (a symlink: no copy, always the current key)."""
    link = state_dir / "bin"
    state_dir.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and Path(os.readlink(link)) == bin_dir:
        return link
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    # Atomic replace: concurrent `up`s (parallel test sessions) may relink at the same time.
    tmp = state_dir / f".bin-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(bin_dir)
    os.replace(tmp, link)
    return link


# --------------------------------------------------------------------------------------------
# State, certificates, kubeconfigs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where one cluster keeps its files, and its ports."""

    state: Path
    port_base: int

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def pids(self) -> Path:
        return self.state / "pids"

    @property
    def bin(self) -> Path:
        return self.state / "bin"

    def port(self, name: str) -> int:
        return self.port_base + PORT_OFFSETS[name]

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port('kube-apiserver')}"


def load_layout(state: Path, port_base: int | None) -> Layout:
    """Reuse the ports recorded in <state>/cluster.json unless the caller picks new ones."""
    meta = state / "cluster.json"
    recorded = json.loads(meta.read_text())["port_base"] if meta.exists() else None
    if (
        port_base is not None
        and recorded is not None
        and port_base != recorded
        and any_running(Layout(state, recorded))
    ):
        raise ClusterError(
            f"a cluster in {state} is running on port base {recorded}; run `down` first or use --dir"
        )
    return Layout(state, port_base or recorded or DEFAULT_PORT_BASE)


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()}")


def _issue_cert(pki: Path, name: str, subject: str, extensions: str, ca: str = "ca") -> None:
    key, crt, ext = pki / f"{name}.key", pki / f"{name}.crt", pki / f"{name}.ext"
    if crt.exists() and key.exists():
        return
    ext.write_text(extensions)
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", str(key))
    csr = pki / f"{name}.csr"
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(pki / f"{ca}.crt"),
        "-CAkey",
        str(pki / f"{ca}.key"),
        "-CAcreateserial",
        "-days",
        "3650",
        "-sha256",
        "-extfile",
        str(ext),
        "-out",
        str(crt),
    )
    csr.unlink()


CLIENTS = {
    # name: subject (CN = user, O = groups). system:masters is fine on a throwaway loopback cluster.
    "admin": "/O=system:masters/CN=shardwise-admin",
    "kube-controller-manager": "/CN=system:kube-controller-manager",
    "kube-scheduler": "/CN=system:kube-scheduler",
    "kwok": "/O=system:masters/CN=system:kwok-controller",
    # Kueue's manager, out of cluster: its chart's ClusterRole would do; masters keeps it short.
    "kueue": "/O=system:masters/CN=kueue-controller-manager",
}


def ensure_pki(layout: Layout) -> None:
    pki = layout.pki
    pki.mkdir(parents=True, exist_ok=True)
    os.chmod(pki, 0o700)
    # "ca" signs serving and client certificates; "front-proxy-ca" only the aggregation-layer
    # proxy client (requestheader authentication), as kubeadm separates them.
    for ca in ("ca", "front-proxy-ca"):
        if not (pki / f"{ca}.crt").exists():
            _openssl(
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(pki / f"{ca}.key"),
                "-out",
                str(pki / f"{ca}.crt"),
                "-days",
                "3650",
                "-subj",
                f"/CN=shardwise-local-{ca}",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            )
    if not (pki / "sa.key").exists():
        # Signs ServiceAccount tokens (kube-apiserver) and legacy token Secrets (controller-manager).
        _openssl(
            "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pki / "sa.key")
        )
        _openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    sans = ",".join(
        [
            "IP:127.0.0.1",
            "IP:10.96.0.1",
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ]
    )
    _issue_cert(
        pki,
        "kube-apiserver",
        "/CN=kube-apiserver",
        f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n",
    )
    _issue_cert(
        pki,
        "front-proxy-client",
        "/CN=front-proxy-client",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n",
        ca="front-proxy-ca",
    )
    for name, subject in CLIENTS.items():
        _issue_cert(
            pki,
            name,
            subject,
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=clientAuth\n",
        )


def kubeconfig_text(layout: Layout, user: str) -> str:
    # JSON is valid YAML; no PyYAML needed.
    pki = layout.pki
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "shardwise-local",
                    "cluster": {"server": layout.server, "certificate-authority": str(pki / "ca.crt")},
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate": str(pki / f"{user}.crt"),
                        "client-key": str(pki / f"{user}.key"),
                    },
                }
            ],
            "contexts": [
                {"name": "shardwise-local", "context": {"cluster": "shardwise-local", "user": user}}
            ],
            "current-context": "shardwise-local",
        },
        indent=2,
    )


def ensure_configs(layout: Layout, bin_dir: Path) -> None:
    for user in CLIENTS:
        path = layout.kubeconfig if user == "admin" else layout.state / f"{user}.kubeconfig"
        path.write_text(kubeconfig_text(layout, user))
        path.chmod(0o600)
    (layout.state / "kube-scheduler.yaml").write_text(
        json.dumps(
            {
                "apiVersion": "kubescheduler.config.k8s.io/v1",
                "kind": "KubeSchedulerConfiguration",
                "clientConnection": {"kubeconfig": str(layout.state / "kube-scheduler.kubeconfig")},
                "leaderElection": {"leaderElect": False},
            },
            indent=2,
        )
    )
    stages = [(bin_dir / "kwok-stages" / Path(rel).name).read_text() for rel in KWOK_STAGE_FILES]
    stages.append(SHARDWISE_STAGES.read_text())
    (layout.state / "kwok.yaml").write_text("\n---\n".join(s.strip() for s in stages) + "\n")


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def command_for(name: str, layout: Layout) -> list[str]:
    b, s, pki = layout.bin, layout.state, layout.pki
    if name == "etcd":
        client, peer = (
            f"http://127.0.0.1:{layout.port('etcd')}",
            f"http://127.0.0.1:{layout.port('etcd-peer')}",
        )
        return [
            str(b / "etcd"),
            "--name=local",
            f"--data-dir={s / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=local={peer}",
            "--initial-cluster-state=new",
            # A throwaway test store: skipping fsync makes it much faster on shared CI disks.
            "--unsafe-no-fsync",
            "--log-level=warn",
            "--quota-backend-bytes=4294967296",
        ]
    if name == "kube-apiserver":
        return [
            str(b / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{layout.port('etcd')}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={layout.port('kube-apiserver')}",
            f"--tls-cert-file={pki / 'kube-apiserver.crt'}",
            f"--tls-private-key-file={pki / 'kube-apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # Aggregation layer / requestheader authentication, so extension API servers (and the
            # controllers reading extension-apiserver-authentication) are configured as in kubeadm.
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            # The default plugin set (NamespaceLifecycle, ServiceAccount, LimitRanger, ResourceQuota,
            # PodSecurity, DefaultTolerationSeconds, webhooks, ...) plus NodeRestriction.
            "--enable-admission-plugins=NodeRestriction",
            # The `kubernetes` Service endpoint would be 127.0.0.1, which Endpoints validation rejects.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
        ]
    if name == "kube-controller-manager":
        kc = s / "kube-controller-manager.kubeconfig"
        return [
            str(b / "kube-controller-manager"),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={layout.port('kube-controller-manager')}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--cluster-name=shardwise-local",
            "--profiling=false",
            "--v=1",
        ]
    if name == "kube-scheduler":
        kc = s / "kube-scheduler.kubeconfig"
        return [
            str(b / "kube-scheduler"),
            f"--config={s / 'kube-scheduler.yaml'}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={layout.port('kube-scheduler')}",
            "--profiling=false",
            "--v=1",
        ]
    if name == "kueue":
        return [
            str(kueue_dir() / "bin" / "kueue"),
            f"--config={s / 'kueue.yaml'}",
            f"--kubeconfig={s / 'kueue.kubeconfig'}",
            "--feature-gates=VisibilityOnDemand=false",  # its aggregated API needs an in-cluster Service
            "--zap-log-level=2",
        ]
    if name == "kwok":
        return [
            str(b / "kwok"),
            f"--kubeconfig={s / 'kwok.kubeconfig'}",
            f"--config={s / 'kwok.yaml'}",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            "--node-lease-duration-seconds=40",
            f"--cidr={POD_CIDR}",
            f"--server-address=127.0.0.1:{layout.port('kwok')}",
        ]
    raise KeyError(name)


def _pid_file(layout: Layout, name: str) -> Path:
    return layout.pids / f"{name}.pid"


def _proc_alive(pid: int, binary: str) -> bool:
    """True if pid is a live (non-zombie) process running `binary` - guards against PID reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X") and Path(cmdline).name == binary


def running_pid(layout: Layout, name: str) -> int | None:
    pid_file = _pid_file(layout, name)
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text().strip())
    except ValueError:
        return None
    return pid if _proc_alive(pid, name) else None


def any_running(layout: Layout) -> bool:
    return any(running_pid(layout, n) for n in COMPONENTS)


def start(layout: Layout, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    layout.logs.mkdir(parents=True, exist_ok=True)
    layout.pids.mkdir(parents=True, exist_ok=True)
    with open(layout.logs / f"{name}.log", "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            command_for(name, layout),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=layout.state,
            env={**os.environ, **env} if env else None,
            start_new_session=True,  # survives this script; `down` stops it
        )
    _pid_file(layout, name).write_text(f"{proc.pid}\n")
    return proc


def stop(layout: Layout, name: str, timeout: float = 15.0) -> None:
    pid = running_pid(layout, name)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _proc_alive(pid, name) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _proc_alive(pid, name):
            log(f"{name} (pid {pid}) ignored SIGTERM; sending SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while _proc_alive(pid, name):
                time.sleep(0.05)
        log(f"stopped {name} (pid {pid})")
    _pid_file(layout, name).unlink(missing_ok=True)


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _http_ok(url: str, context: ssl.SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def health_probe(layout: Layout, name: str) -> tuple[str, ssl.SSLContext | None]:
    if name == "etcd":
        return f"http://127.0.0.1:{layout.port('etcd')}/health", None
    if name == "kube-apiserver":
        ctx = ssl.create_default_context(cafile=str(layout.pki / "ca.crt"))
        ctx.load_cert_chain(str(layout.pki / "admin.crt"), str(layout.pki / "admin.key"))
        return f"{layout.server}/readyz", ctx
    if name == "kwok":
        return f"http://127.0.0.1:{layout.port('kwok')}/healthz", None
    if name == "kueue":
        return f"http://127.0.0.1:{layout.port('kueue')}/readyz", None
    return f"https://127.0.0.1:{layout.port(name)}/healthz", _insecure()


def wait_healthy(layout: Layout, name: str, alive: Callable[[], bool], timeout: float = 120.0) -> None:
    url, ctx = health_probe(layout, name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise ClusterError(
                f"{name} exited during start-up; last log lines:\n{_tail(layout.logs / f'{name}.log')}"
            )
        if _http_ok(url, ctx):
            return
        time.sleep(0.25)
    raise ClusterError(
        f"{name} not healthy at {url} after {timeout:.0f}s; log: {layout.logs / f'{name}.log'}"
    )


def check_ports_free(layout: Layout, names: list[str]) -> None:
    for name in names:
        ports = [layout.port(name)] + ([layout.port("etcd-peer")] if name == "etcd" else [])
        for port in ports:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    raise ClusterError(
                        f"port {port} (for {name}) is already in use on 127.0.0.1; pick another --port-base"
                    )


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuShape:
    gpus: int = 8
    product: str = "NVIDIA-H100-80GB-HBM3"
    memory_mib: int = 81559
    cpu: str = "192"
    memory: str = "2015Gi"
    pods: int = 110


def node_manifest(name: str, shape: GpuShape) -> dict[str, Any]:
    resources = {
        "cpu": shape.cpu,
        "memory": shape.memory,
        "pods": str(shape.pods),
        "ephemeral-storage": "3500Gi",
        "nvidia.com/gpu": str(shape.gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            # KWOK manages nodes carrying this annotation (see --manage-nodes-with-annotation-selector).
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                NODE_LABEL: "true",
                # GPU Feature Discovery labels, as the NVIDIA GPU operator sets them.
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": shape.product,
                "nvidia.com/gpu.memory": str(shape.memory_mib),
                "nvidia.com/gpu.count": str(shape.gpus),
            },
        },
        "spec": {},
        # Nodes accept status on create; KWOK's node-initialize stage keeps capacity/allocatable.
        "status": {"capacity": resources, "allocatable": dict(resources)},
    }


def kubectl(layout: Layout, *args: str, stdin: str | None = None, check: bool = True) -> str:
    result = subprocess.run(
        [str(layout.bin / "kubectl"), f"--kubeconfig={layout.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    if check and result.returncode != 0:
        raise ClusterError(
            f"kubectl {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}"
        )
    return result.stdout


def existing_nodes(layout: Layout) -> list[str]:
    out = kubectl(layout, "get", "nodes", "-o", "jsonpath={.items[*].metadata.name}")
    return out.split()


def create_nodes(layout: Layout, names: list[str], shape: GpuShape, timeout: float = 120.0) -> list[str]:
    """Create the named nodes that do not exist yet; wait until all named nodes are Ready."""
    present = set(existing_nodes(layout))
    missing = [n for n in names if n not in present]
    if missing:
        items = {"apiVersion": "v1", "kind": "List", "items": [node_manifest(n, shape) for n in missing]}
        kubectl(layout, "create", "-f", "-", stdin=json.dumps(items))
        log(f"created {len(missing)} node(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    wait_nodes_ready(layout, names, timeout)
    return missing


def wait_nodes_ready(layout: Layout, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    wanted = set(names)
    while True:
        out = kubectl(layout, "get", "nodes", "-o", "json")
        # Ready is not enough: until the node lifecycle controller lifts the
        # node.kubernetes.io/not-ready taint it adds at registration, nothing schedules there.
        ready = {
            item["metadata"]["name"]
            for item in json.loads(out)["items"]
            if any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in item.get("status", {}).get("conditions", [])
            )
            and not any(
                t.get("key", "").startswith("node.kubernetes.io/")
                for t in item.get("spec", {}).get("taints") or []
            )
        }
        if wanted <= ready:
            return
        if time.monotonic() > deadline:
            raise ClusterError(
                f"nodes not Ready and schedulable after {timeout:.0f}s: {sorted(wanted - ready)[:10]}; "
                f"see {layout.logs / 'kwok.log'}"
            )
        time.sleep(0.5)


GFD_SHAPE_LABELS = ("nvidia.com/gpu.product", "nvidia.com/gpu.memory", "nvidia.com/gpu.count")


def node_fingerprint(node: dict[str, Any]) -> dict[str, Any]:
    """What `up`'s shape decides about a node: the GFD labels and the allocatable resources."""
    labels = node.get("metadata", {}).get("labels", {})
    allocatable = node.get("status", {}).get("allocatable", {})
    return {
        "labels": {k: labels.get(k) for k in GFD_SHAPE_LABELS},
        "allocatable": {k: allocatable.get(k) for k in ("nvidia.com/gpu", "cpu", "memory")},
    }


def up_nodes_file(layout: Layout) -> Path:
    """The nodes `up` created (its shape): `up` removes those no longer asked for."""
    return layout.state / "up-nodes.json"


def apply_node_shape(layout: Layout, names: list[str], shape: GpuShape) -> None:
    """Make the nodes `up` manages match the request: delete the ones an earlier `up` created that are
    not asked for any more, recreate asked-for nodes whose shape differs, create missing ones.
    Nodes added with `add-nodes` are kept and named, with how to remove them."""
    record = up_nodes_file(layout)
    owned = set(json.loads(record.read_text())) if record.exists() else set()
    nodes = {
        n["metadata"]["name"]: n for n in json.loads(kubectl(layout, "get", "nodes", "-o", "json"))["items"]
    }
    wanted = set(names)
    stale = sorted(n for n in owned & set(nodes) if n not in wanted)
    reshaped = sorted(
        n
        for n in wanted & set(nodes)
        if node_fingerprint(nodes[n]) != node_fingerprint(node_manifest(n, shape))
    )
    if stale or reshaped:
        kubectl(layout, "delete", "node", "--wait=true", *stale, *reshaped)
        if stale:
            log(
                f"removed {len(stale)} node(s) an earlier `up` created, not asked for now: {', '.join(stale)}"
            )
        if reshaped:
            log(f"recreated {len(reshaped)} node(s) with the requested GPU shape: {', '.join(reshaped)}")
    record.write_text(json.dumps(sorted(names)) + "\n")
    create_nodes(layout, names, shape)
    others = sorted(
        n
        for n in nodes
        if n not in wanted and n not in owned and NODE_LABEL in nodes[n]["metadata"].get("labels", {})
    )
    if others:
        log(
            f"kept {len(others)} node(s) `up` did not create (add-nodes): "
            f"{', '.join(others[:5])}{' ...' if len(others) > 5 else ''} (remove with "
            "`kubectl delete node NAME`, or start fresh with `hack/local-cluster down --purge`)"
        )


def report_reused_state(layout: Layout) -> None:
    """`up` over an earlier run's etcd data brings its objects back: say so and how to start fresh."""
    jobs = kubectl(layout, "get", "paralleltrainingjobs", "-A", "-o", "name", check=False).split()
    pods = [
        line
        for line in kubectl(layout, "get", "pods", "-A", "--no-headers", check=False).splitlines()
        if line and not line.startswith("kube-system")
    ]
    log(
        f"reusing the cluster state of an earlier run in {layout.state} ({len(jobs)} ParallelTrainingJob(s), "
        f"{len(pods)} pod(s) kept in etcd); `hack/local-cluster down --purge` then `up` starts empty"
    )


def next_node_names(layout: Layout, prefix: str, count: int) -> list[str]:
    taken = set(existing_nodes(layout))
    names: list[str] = []
    index = 0
    while len(names) < count:
        name = f"{prefix}-{index}"
        if name not in taken:
            names.append(name)
        index += 1
    return names


def wait_default_service_account(layout: Layout, timeout: float = 60.0) -> None:
    """The controller-manager creates `default` ServiceAccounts; tests need one for `create token`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kubectl(layout, "get", "serviceaccount", "default", "-n", "default", check=False).strip():
            return
        time.sleep(0.5)
    raise ClusterError(f"no default ServiceAccount after {timeout:.0f}s; see {layout.logs}")


# --------------------------------------------------------------------------------------------
# Kueue
# --------------------------------------------------------------------------------------------


def kueue_config(layout: Layout) -> dict[str, Any]:
    """Kueue's Configuration: out of cluster, no leader election, its own certificate, PTJ external."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{layout.port('kueue')}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {
            "host": "127.0.0.1",
            "port": layout.port("kueue-webhook"),
            "certDir": str(layout.state / "kueue-certs"),
        },
        "leaderElection": {"leaderElect": False},
        # Its cert rotator writes a Secret and patches webhook configurations it expects to point
        # at an in-cluster Service; here this script issues the certificate and registers URLs.
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"], "externalFrameworks": [KUEUE_EXTERNAL_FRAMEWORK]},
    }


def kueue_webhooks(layout: Layout, manifests: Path) -> list[dict[str, Any]]:
    """Kueue's own API webhooks (ClusterQueue, Workload, ...), pointed at the loopback server by URL.

    Only the kueue.x-k8s.io ones: the job-integration webhooks (Pods, batch Jobs, Deployments, ...)
    would intercept every such object of the cluster; shardwise's jobs need none of them.
    """
    text = kubectl(layout, "create", "--dry-run=client", "-o", "json", "-f", str(manifests))
    items: list[dict[str, Any]] = []
    decoder, at = json.JSONDecoder(), 0
    while text[at:].strip():  # one JSON document per object, back to back
        obj, end = decoder.raw_decode(text, at + len(text[at:]) - len(text[at:].lstrip()))
        items.extend(obj.get("items") or [obj])
        at = end
    ca = base64.b64encode((layout.pki / "ca.crt").read_bytes()).decode()
    base = f"https://127.0.0.1:{layout.port('kueue-webhook')}"
    out = []
    for item in items:
        hooks = []
        for hook in item.get("webhooks") or []:
            path = ((hook.get("clientConfig") or {}).get("service") or {}).get("path", "")
            if "kueue-x-k8s-io" not in path:
                continue
            hook["clientConfig"] = {"url": base + path, "caBundle": ca}
            hooks.append(hook)
        item["metadata"] = {"name": f"kueue-{item['metadata']['name']}"}
        item["webhooks"] = hooks
        out.append(item)
    return out


def start_kueue(layout: Layout) -> None:
    """Build (cached) and start Kueue against this cluster; idempotent."""
    d = build_kueue()
    kubectl(layout, "apply", "--server-side", "--force-conflicts", "-f", str(d / "crds"))
    kubectl(layout, "wait", "--for=condition=Established", "--timeout=60s", "-f", str(d / "crds"))
    if not kubectl(layout, "get", "namespace", "kueue-system", "--ignore-not-found", "-o", "name").strip():
        kubectl(layout, "create", "namespace", "kueue-system")
    certs = layout.state / "kueue-certs"
    certs.mkdir(exist_ok=True)
    _issue_cert(
        layout.pki,
        "kueue-webhook",
        "/CN=kueue-webhook",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    shutil.copyfile(layout.pki / "kueue-webhook.crt", certs / "tls.crt")
    shutil.copyfile(layout.pki / "kueue-webhook.key", certs / "tls.key")
    (layout.state / "kueue.yaml").write_text(json.dumps(kueue_config(layout), indent=2))
    kc = layout.state / "kueue.kubeconfig"
    kc.write_text(kubeconfig_text(layout, "kueue"))
    kc.chmod(0o600)
    pid = running_pid(layout, "kueue")
    if pid is None:
        check_ports_free(layout, ["kueue", "kueue-webhook"])
        proc = start(layout, "kueue", env={"KUEUE_METRICS_CERT_DIR": str(certs)})
        log(
            f"started kueue (pid {proc.pid}, webhooks on port {layout.port('kueue-webhook')}, "
            "log logs/kueue.log)"
        )
        wait_healthy(layout, "kueue", lambda: proc.poll() is None)
    else:
        wait_healthy(layout, "kueue", lambda: _proc_alive(pid, "kueue"))
    for config in kueue_webhooks(layout, d / "webhooks.yaml"):
        kubectl(layout, "apply", "--server-side", "--force-conflicts", "-f", "-", stdin=json.dumps(config))


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------


def cmd_build(args: argparse.Namespace) -> int:
    if args.check and args.kueue:
        print(kueue_dir() if kueue_present() else f"not built: {kueue_dir()}")
        return 0 if kueue_present() else 3
    if args.kueue:
        started = time.monotonic()
        print(build_kueue(force=args.force))
        log(f"Kueue ready in {time.monotonic() - started:.1f}s")
        return 0
    if args.check:
        present = binaries_present(cached_bin_dir())
        print(cached_bin_dir() if present else f"not built: {cached_bin_dir()}")
        return 0 if present else 3
    started = time.monotonic()
    bin_dir = build(force=args.force)
    print(bin_dir)
    log(f"binaries ready in {time.monotonic() - started:.1f}s: {bin_dir}")
    return 0


def _shape(args: argparse.Namespace) -> GpuShape:
    return GpuShape(
        gpus=args.gpus_per_node,
        product=args.gpu_product,
        memory_mib=args.gpu_memory_mib,
        cpu=args.cpu_per_node,
        memory=args.memory_per_node,
    )


def cmd_up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    state = Path(args.dir).resolve()
    bin_dir = build()
    layout = load_layout(state, args.port_base)
    state.mkdir(parents=True, exist_ok=True)
    link_bin_dir(bin_dir, state)
    ensure_pki(layout)
    ensure_configs(layout, bin_dir)
    (state / "cluster.json").write_text(
        json.dumps({"port_base": layout.port_base, "server": layout.server, **versions()}, indent=2)
    )
    to_start = [n for n in COMPONENTS if running_pid(layout, n) is None]
    # etcd data from an earlier run, with the control plane down: its objects come back.
    restarting = "kube-apiserver" in to_start and (state / "etcd").is_dir()
    check_ports_free(layout, to_start)
    for name in COMPONENTS:
        pid = running_pid(layout, name)
        if pid is None:
            # Our own child: poll() is exact (right after fork /proc still shows python's cmdline).
            proc = start(layout, name)
            log(f"started {name} (pid {proc.pid}, port {layout.port(name)}, log logs/{name}.log)")
            wait_healthy(layout, name, lambda: proc.poll() is None)  # noqa: B023 - called right here
        else:
            wait_healthy(layout, name, lambda: _proc_alive(pid, name))  # noqa: B023
    names = [f"{args.node_prefix}-{i}" for i in range(args.gpu_nodes)]
    apply_node_shape(layout, names, _shape(args))
    wait_default_service_account(layout)
    if args.kueue:
        start_kueue(layout)
    if restarting:
        report_reused_state(layout)
    log(f"cluster up in {time.monotonic() - started:.1f}s: {layout.server}, {args.gpu_nodes} GPU node(s)")
    print(f"export KUBECONFIG={layout.kubeconfig}")
    return 0


def cmd_add_nodes(args: argparse.Namespace) -> int:
    layout = load_layout(Path(args.dir).resolve(), None)
    if running_pid(layout, "kube-apiserver") is None or running_pid(layout, "kwok") is None:
        raise ClusterError(f"no running cluster in {layout.state}; run `up` first")
    names = args.name or next_node_names(layout, args.node_prefix, args.count)
    create_nodes(layout, names, _shape(args), timeout=max(120.0, 2.0 * len(names)))
    print("\n".join(names))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    state = Path(args.dir).resolve()
    layout = load_layout(state, None)
    for name in ("kueue", *reversed(COMPONENTS)):
        stop(layout, name)
    if args.purge and state.exists():
        shutil.rmtree(state / "etcd", ignore_errors=True)
        for sub in ("pki", "logs", "pids"):
            shutil.rmtree(state / sub, ignore_errors=True)
        for f in state.glob("*"):
            if f.is_file() or f.is_symlink():
                f.unlink()
        log(f"purged {state}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    layout = load_layout(Path(args.dir).resolve(), None)
    running = 0
    for name in COMPONENTS:
        pid = running_pid(layout, name)
        running += pid is not None
        where = f"127.0.0.1:{layout.port(name)}"
        print(f"{name:24} {'running pid ' + str(pid) if pid else 'stopped':20} {where}")
    if running_pid(layout, "kube-apiserver"):
        nodes = existing_nodes(layout)
        print(f"server {layout.server}; {len(nodes)} node(s); KUBECONFIG={layout.kubeconfig}")
    return 0 if running == len(COMPONENTS) else 1


def cmd_env(args: argparse.Namespace) -> int:
    print(f"export KUBECONFIG={Path(args.dir).resolve() / 'kubeconfig'}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hack/local-cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_dir(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--dir", default=str(DEFAULT_STATE_DIR), help="state dir (default .cache/local-cluster)"
        )
        return sp

    def with_shape(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--gpus-per-node", type=int, default=8)
        sp.add_argument("--gpu-product", default="NVIDIA-H100-80GB-HBM3")
        sp.add_argument("--gpu-memory-mib", type=int, default=81559)
        sp.add_argument("--cpu-per-node", default="192")
        sp.add_argument("--memory-per-node", default="2015Gi")
        sp.add_argument("--node-prefix", default="gpu-node")

    b = sub.add_parser("build", help="build (or reuse) the cached binaries")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--check", action="store_true", help="only report: exit 0 if cached, 3 if not")
    b.add_argument("--kueue", action="store_true", help=f"only Kueue {KUEUE_VERSION} (cached)")
    b.set_defaults(func=cmd_build)

    up = with_dir(sub.add_parser("up", help="start the control plane and the fake GPU nodes (idempotent)"))
    up.add_argument("--gpu-nodes", type=int, default=2)
    up.add_argument(
        "--port-base",
        type=int,
        default=None,
        help=f"first of 6 consecutive loopback ports (default {DEFAULT_PORT_BASE})",
    )
    up.add_argument(
        "--kueue", action="store_true", help=f"also build (cached) and start Kueue {KUEUE_VERSION}"
    )
    with_shape(up)
    up.set_defaults(func=cmd_up)

    add = with_dir(sub.add_parser("add-nodes", help="add GPU nodes to a running cluster"))
    add.add_argument("--count", type=int, default=1)
    add.add_argument("--name", action="append", help="explicit node name (repeatable); overrides --count")
    with_shape(add)
    add.set_defaults(func=cmd_add_nodes)

    down = with_dir(sub.add_parser("down", help="stop every component started from this state dir"))
    down.add_argument("--purge", action="store_true", help="also delete etcd data, certificates and logs")
    down.set_defaults(func=cmd_down)

    with_dir(sub.add_parser("status", help="show components, ports and nodes")).set_defaults(func=cmd_status)
    with_dir(sub.add_parser("env", help="print `export KUBECONFIG=...`")).set_defaults(func=cmd_env)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ClusterError as err:
        log(f"error: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
