"""Start the operator process: login, metrics endpoint, kopf's watch loops and the reconcile workers."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import kopf
from kopf._core.engines.peering import Identity  # kopf exports the type only privately
from prometheus_client import CONTENT_TYPE_LATEST

from shardwise.handlers import app
from shardwise.metrics.exporter import exposition
from shardwise.metrics.progress import DEFAULT_PROGRESS_INTERVAL_SECONDS
from shardwise.metrics.scrape import DEFAULT_STATS_MAX_BYTES

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@kopf.on.login()
def _login(settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
    # In a pod: the ServiceAccount, at the address the kubelet gives in KUBERNETES_SERVICE_*
    # (kopf's own helper assumes cluster DNS for kubernetes.default.svc). Elsewhere: $KUBECONFIG.
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token_path = os.path.join(SERVICE_ACCOUNT_DIR, "token")
    if host and not os.environ.get("KUBECONFIG") and os.path.exists(token_path):
        token = Path(token_path).read_text(encoding="utf-8").strip()
        ca_path = os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt")
        ns_file = Path(SERVICE_ACCOUNT_DIR, "namespace")
        namespace = ns_file.read_text(encoding="utf-8").strip() if ns_file.exists() else None
        server_host = f"[{host}]" if ":" in host else host
        return kopf.ConnectionInfo(
            server=f"https://{server_host}:{port}",
            ca_path=ca_path if os.path.exists(ca_path) else None,
            token=token or None,
            default_namespace=namespace or None,
            trust_env=settings.networking.trust_env,
        )
    return kopf.login_with_kubeconfig(settings=settings, **kwargs)


def run_operator(
    *,
    namespaces: list[str],
    metrics_port: int,
    metrics_address: str = "0.0.0.0",
    kubeconfig: str | None = None,
    liveness_endpoint: str | None = None,
    workers: int = 8,
    restart_backoff_seconds: float = 10.0,
    stats_max_bytes: int = DEFAULT_STATS_MAX_BYTES,
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL_SECONDS,
    topology_label: str = "nvidia.com/gpu.clique",
) -> None:
    """Run until interrupted; watches all namespaces unless some are given."""
    if kubeconfig:
        os.environ["KUBECONFIG"] = os.path.abspath(kubeconfig)
    app.CONTROLLER.kubeconfig = (
        os.environ.get("KUBECONFIG") if kubeconfig or os.environ.get("KUBECONFIG") else None
    )
    app.CONTROLLER.workers = workers
    app.CONTROLLER.restart_backoff_seconds = restart_backoff_seconds
    app.CONTROLLER.stats_max_bytes = stats_max_bytes
    app.CONTROLLER.progress_interval = progress_interval
    app.CONTROLLER.topology_label = topology_label
    if metrics_port:
        serve_metrics(metrics_address, metrics_port)
        logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", metrics_address, metrics_port)
    asyncio.run(
        kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=True,
            liveness_endpoint=liveness_endpoint,
            # kopf derives an identity from getpass.getuser(), which fails for a UID without a
            # passwd entry (the restricted image runs as 65532).
            identity=Identity(f"shardwise-{socket.gethostname()}-{os.getpid()}"),
        )
    )


class _MetricsHandler(BaseHTTPRequestHandler):
    """GET /metrics: the operator's own metrics plus every job's (see shardwise.metrics.exporter)."""

    def do_GET(self) -> None:
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = exposition(app.CONTROLLER.metrics.registry, app.CONTROLLER.exporter)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        del format, args  # one line per scrape is noise


def serve_metrics(address: str, port: int) -> ThreadingHTTPServer:
    """Serve /metrics from a daemon thread (scrapes never wait on the reconcile loop)."""
    server = ThreadingHTTPServer((address, port), _MetricsHandler)
    Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
