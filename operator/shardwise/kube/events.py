"""Posting Kubernetes Events on a ParallelTrainingJob (core/v1 Events, deduplicated by the caller)."""

from __future__ import annotations

import itertools
import logging
import time
from datetime import UTC, datetime
from typing import Any

from shardwise.kube.client import Kube, KubeError

log = logging.getLogger(__name__)
COMPONENT = "shardwise-operator"
_SEQUENCE = itertools.count()


def event_name(job_name: str, nanos: int, sequence: int) -> str:
    """`<job>.<hex>`, as client-go's recorder names Events: fixed before the first POST, so a
    retried POST whose first try landed (a timeout after the write) meets a 409, not a twin."""
    return f"{job_name}.{nanos:x}{sequence % 4096:03x}"


async def post_event(kube: Kube, job: dict[str, Any], etype: str, reason: str, message: str) -> None:
    """Best effort: an Event that cannot be posted is logged, never fails the reconcile."""
    meta = job["metadata"]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": event_name(meta["name"], time.time_ns(), next(_SEQUENCE)),
            "namespace": meta["namespace"],
        },
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
        if exc.status == 409:
            return  # an earlier try of this very POST was written: the Event is there once
        if exc.status == 403 and "NamespaceTerminating" in exc.body:
            return  # the namespace, and the job with it, is going away
        log.warning("could not post Event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc)
