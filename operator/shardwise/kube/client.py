"""An async JSON client for the API server: kubeconfig / in-cluster auth, retries, plain dicts.

Everything above this module works with plain dicts (what the API server sends), so the pure
builders and the tests never touch generated client models.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from shardwise.kube.retry import RetryPolicy

log = logging.getLogger(__name__)

MERGE_PATCH: Final = "application/merge-patch+json"

_PATHS: Final[dict[tuple[str, str], tuple[str, str]]] = {
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Event"): ("/api/v1", "events"),
    ("v1", "Node"): ("/api/v1", "nodes"),
    ("shardwise.dev/v1alpha1", "ParallelTrainingJob"): (
        "/apis/shardwise.dev/v1alpha1",
        "paralleltrainingjobs",
    ),
    # Gang scheduling (spec.scheduling.gang): scheduler-plugins' coscheduling, Volcano.
    ("scheduling.x-k8s.io/v1alpha1", "PodGroup"): ("/apis/scheduling.x-k8s.io/v1alpha1", "podgroups"),
    ("scheduling.volcano.sh/v1beta1", "PodGroup"): ("/apis/scheduling.volcano.sh/v1beta1", "podgroups"),
    # Kueue (only for jobs labelled kueue.x-k8s.io/queue-name).
    ("kueue.x-k8s.io/v1beta2", "Workload"): ("/apis/kueue.x-k8s.io/v1beta2", "workloads"),
    ("kueue.x-k8s.io/v1beta2", "ResourceFlavor"): ("/apis/kueue.x-k8s.io/v1beta2", "resourceflavors"),
    ("kueue.x-k8s.io/v1beta2", "WorkloadPriorityClass"): (
        "/apis/kueue.x-k8s.io/v1beta2",
        "workloadpriorityclasses",
    ),
}


class KubeError(Exception):
    """An API call failed with a status that retrying will not fix."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(f"{status} {reason}: {body[:500]}")
        self.status = status
        self.reason = reason
        self.body = body

    @property
    def message(self) -> str:
        """The API server's own words (the Status object's message), else the raw body."""
        try:
            status = json.loads(self.body)
        except ValueError:
            return self.body[:1000]
        if isinstance(status, dict) and status.get("message"):
            return str(status["message"])
        return self.body[:1000]


def resource_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    """REST path of a collection (name None) or one object."""
    try:
        prefix, plural = _PATHS[(api_version, kind)]
    except KeyError:
        raise ValueError(f"no REST path known for {api_version} {kind}") from None
    path = prefix
    if namespace is not None:
        path += f"/namespaces/{quote(namespace, safe='')}"
    path += f"/{plural}"
    if name is not None:
        path += f"/{quote(name, safe='')}"
    return path


@dataclass
class Kube:
    """A thin async wrapper over the API server returning plain dicts, with bounded retries."""

    api: Any  # kubernetes_asyncio.client.ApiClient
    attempts: int = 5
    base_delay: float = 0.2
    timeout_seconds: float = 20.0

    @classmethod
    async def connect(cls, kubeconfig: str | None = None) -> Kube:
        """Kubeconfig (given, $KUBECONFIG or ~/.kube/config) or the in-cluster ServiceAccount."""
        configuration = k8s_client.Configuration()
        if (
            kubeconfig is None
            and os.environ.get("KUBERNETES_SERVICE_HOST")
            and not os.environ.get("KUBECONFIG")
        ):
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        # The default pool (5 per core) queues a burst of job creations behind a handful of
        # connections; the API server handles many more concurrent requests than that.
        configuration.connection_pool_maxsize = 32
        return cls(api=k8s_client.ApiClient(configuration))

    async def close(self) -> None:
        await self.api.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One API call; retried on 429 / 5xx / timeouts / dropped connections after the server's
        Retry-After, else jittered exponential backoff (shardwise.kube.retry)."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        for attempt in range(self.attempts):
            try:
                result = await self.api.call_api(
                    path,
                    method,
                    query_params=list((query or {}).items()),
                    header_params=dict(headers),
                    body=body,
                    response_types_map={200: "object", 201: "object", 202: "object"},
                    auth_settings=["BearerToken"],
                    _return_http_data_only=True,
                    _request_timeout=self.timeout_seconds,
                )
                return result if isinstance(result, dict) else {}
            except ApiException as exc:
                status = int(exc.status or 0)
                text = exc.body.decode() if isinstance(exc.body, bytes) else str(exc.body or "")
                if self.policy.retryable(status, attempt):
                    await self._wait(attempt, f"{method} {path}: {status}", exc.headers)
                    continue
                raise KubeError(status, str(exc.reason), text) from None
            except (TimeoutError, OSError, aiohttp.ClientError) as exc:
                # A dropped connection (the API server restarted, a proxy reset) is transient.
                if self.policy.retryable(None, attempt):
                    await self._wait(attempt, f"{method} {path}: {exc!r}", None)
                    continue
                raise KubeError(0, type(exc).__name__, str(exc)) from None
        raise AssertionError("unreachable")

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.attempts, base_delay=self.base_delay)

    async def _wait(self, attempt: int, what: str, headers: Any) -> None:
        delay = self.policy.delay(attempt, dict(headers) if headers else None)
        log.info("retrying %s in %.2fs", what, delay)
        await asyncio.sleep(delay)

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        return await self.request("POST", path, body=obj)

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        return await self.request("GET", resource_path(api_version, kind, namespace, name))

    async def list(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else None
        result = await self.request("GET", resource_path(api_version, kind, namespace), query=query)
        items: list[dict[str, Any]] = result.get("items") or []
        return items

    async def merge_patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        patch: dict[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        path = resource_path(api_version, kind, namespace, name)
        if subresource:
            path += f"/{subresource}"
        return await self.request("PATCH", path, body=patch, content_type=MERGE_PATCH)

    async def delete(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        *,
        uid: str | None = None,
        grace_period_seconds: int | None = None,
    ) -> bool:
        """Delete in the background; a uid precondition guards against deleting a newer namesake.

        grace_period_seconds=0 is a force delete: the object goes at once, without waiting for a
        kubelet to confirm. Returns False when there was nothing (of that uid) left to delete.
        """
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        if grace_period_seconds is not None:
            body["gracePeriodSeconds"] = grace_period_seconds
        try:
            await self.request("DELETE", resource_path(api_version, kind, namespace, name), body=body)
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise
            return False
        return True
