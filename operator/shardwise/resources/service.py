"""The headless Service that gives each trainer pod a stable DNS name for torchrun's rendezvous."""

from __future__ import annotations

from typing import Any

from shardwise.resources.names import (
    LABEL_JOB,
    RENDEZVOUS_PORT,
    TRAINER_METRICS_PORT,
    service_name,
)
from shardwise.resources.owner import child_metadata


def build_service(job: dict[str, Any]) -> dict[str, Any]:
    """Headless Service `<job>` selecting the job's pods.

    publishNotReadyAddresses is set because torchrun resolves node 0 before any pod is ready:
    readiness would otherwise hide the very address the rendezvous needs.
    """
    name = job["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(job, service_name(name), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: name},
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT},
                {"name": "metrics", "port": TRAINER_METRICS_PORT, "targetPort": TRAINER_METRICS_PORT},
            ],
        },
    }
