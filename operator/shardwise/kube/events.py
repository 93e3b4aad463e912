"""Posting Kubernetes Events on a ParallelTrainingJob (core/v1 Events, deduplicated by the caller)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from shardwise.kube.client import Kube, KubeError

log = logging.getLogger(__name__)
COMPONENT = "shardwise-operator"


async def post_event(kube: Kube, job: dict[str, Any], etype: str, reason: str, message: str) -> None:
    """Best effort: an Event that cannot be posted is logged, never fails the reconcile."""
    meta = job["metadata"]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": job.get("apiVersion", "shardwise.dev/v1alpha1"),
            "kind": job.get("kind", "ParallelTrainingJob"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": etype,
        "reason": reason[:128],
        "message": message[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": COMPONENT,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        await kube.create(event)
    except KubeError as exc:
        if exc.status == 403 and "NamespaceTerminating" in exc.body:
            return  # the namespace, and the job with it, is going away
        log.warning("could not post Event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc)
