"""Create-or-patch of a job's children: a 409 on create is success, a foreign owner is a conflict."""

from __future__ import annotations

import logging
from typing import Any

from shardwise.kube.client import Kube, KubeError

log = logging.getLogger(__name__)


class ChildConflictError(Exception):
    """A child's fixed name is taken by an object the job does not control."""


def controller_uid(obj: dict[str, Any]) -> str | None:
    """The uid of the object's controller (ownerReference with controller: true), if any."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def _drift(desired: dict[str, Any], actual: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that brings the fields we own back to the desired state (empty if none)."""
    patch: dict[str, Any] = {}
    if desired["kind"] == "ConfigMap" and actual.get("data") != desired.get("data"):
        patch["data"] = desired.get("data")
    if desired["kind"] == "Service":
        want, have = desired["spec"], actual.get("spec") or {}
        if want.get("selector") != have.get("selector") or [p["port"] for p in want["ports"]] != [
            p.get("port") for p in have.get("ports") or []
        ]:
            patch["spec"] = {"selector": want["selector"], "ports": want["ports"]}
    want_labels = desired["metadata"].get("labels") or {}
    have_labels = (actual.get("metadata") or {}).get("labels") or {}
    if any(have_labels.get(k) != v for k, v in want_labels.items()):
        patch["metadata"] = {"labels": want_labels}
    return patch


async def ensure(
    kube: Kube, desired: dict[str, Any], *, patch_drift: bool = True
) -> tuple[dict[str, Any], bool]:
    """Create the object, or adopt the existing one if this job controls it; returns (object, created).

    Pods are never patched (their spec is immutable): pass patch_drift=False.
    """
    meta = desired["metadata"]
    owner_uid = meta["ownerReferences"][0]["uid"]
    try:
        return await kube.create(desired), True
    except KubeError as exc:
        if exc.status != 409:
            raise
    actual = await kube.get(desired["apiVersion"], desired["kind"], meta["namespace"], meta["name"])
    if controller_uid(actual) != owner_uid:
        raise ChildConflictError(
            f"{desired['kind']} {meta['namespace']}/{meta['name']} already exists and is not controlled"
            " by this job; delete or rename it"
        )
    if patch_drift:
        patch = _drift(desired, actual)
        if patch:
            log.info("patching drifted %s %s/%s", desired["kind"], meta["namespace"], meta["name"])
            actual = await kube.merge_patch(
                desired["apiVersion"], desired["kind"], meta["namespace"], meta["name"], patch
            )
    return actual, False
