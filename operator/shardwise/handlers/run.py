"""Start the operator process: login, metrics endpoint, kopf's watch loops and the reconcile workers."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf
from prometheus_client import start_http_server

from shardwise.handlers import app


@kopf.on.login()
def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # In a pod the ServiceAccount; elsewhere $KUBECONFIG. No client library is needed for either.
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        return kopf.login_with_service_account(**kwargs)
    return kopf.login_with_kubeconfig(**kwargs)


def run_operator(
    *,
    namespaces: list[str],
    metrics_port: int,
    metrics_address: str = "0.0.0.0",
    kubeconfig: str | None = None,
    liveness_endpoint: str | None = None,
    workers: int = 8,
    restart_backoff_seconds: float = 10.0,
) -> None:
    """Run until interrupted; watches all namespaces unless some are given."""
    if kubeconfig:
        os.environ["KUBECONFIG"] = os.path.abspath(kubeconfig)
    app.CONTROLLER.kubeconfig = (
        os.environ.get("KUBECONFIG") if kubeconfig or os.environ.get("KUBECONFIG") else None
    )
    app.CONTROLLER.workers = workers
    app.CONTROLLER.restart_backoff_seconds = restart_backoff_seconds
    if metrics_port:
        start_http_server(metrics_port, addr=metrics_address, registry=app.CONTROLLER.metrics.registry)
        logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", metrics_address, metrics_port)
    asyncio.run(
        kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=True,
            liveness_endpoint=liveness_endpoint,
        )
    )
