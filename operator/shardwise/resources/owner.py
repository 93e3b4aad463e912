"""Controller owner references and object metadata shared by the child builders."""

from __future__ import annotations

from typing import Any

from shardwise.resources.names import API_VERSION, KIND, job_labels


def owner_reference(job: dict[str, Any]) -> dict[str, Any]:
    """A controller reference to the job, so garbage collection removes the children with it."""
    meta = job["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(
    job: dict[str, Any], name: str, component: str, extra_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """Metadata for a child: fixed name, the job's namespace, labels and the owner reference."""
    labels = job_labels(job["metadata"]["name"])
    labels["app.kubernetes.io/component"] = component
    labels.update(extra_labels or {})
    return {
        "name": name,
        "namespace": job["metadata"]["namespace"],
        "labels": labels,
        "ownerReferences": [owner_reference(job)],
    }
