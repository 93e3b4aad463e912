"""The one API client (operator and node runner): lightkube's kubeconfig, auth and HTTP; plain dicts.

lightkube (with its httpx2 transport) reads the kubeconfig or the in-cluster ServiceAccount
(client certificates, tokens, rotated token files, exec plugins) and holds the connection pool.
The calls are plain JSON on REST paths, so everything above this module works with the dicts the
API server sends, and the uid preconditions of a delete (DeleteOptions in the body, which
lightkube's typed delete cannot send) and subresources such as pods/status need no special case.
Every call goes through one retry policy (shardwise.kube.retry).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import httpx2
from lightkube import KubeConfig
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.models import Cluster, User

from shardwise.kube.retry import RetryPolicy

log = logging.getLogger(__name__)
# httpx2 logs every request at INFO: the operator's log would be one line per API call.
logging.getLogger("httpx2").setLevel(logging.WARNING)

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
    """An API call failed with a status that retrying will not fix (status 0: no answer at all)."""

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


class WatchExpiredError(Exception):
    """A watch's resourceVersion is too old (HTTP 410 Gone): list again, then watch from there."""


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
    """A thin async client over the API server returning plain dicts, with bounded retries."""

    http: httpx2.AsyncClient
    attempts: int = 5
    base_delay: float = 0.2
    timeout_seconds: float = 20.0

    @classmethod
    async def connect(cls, kubeconfig: str | None = None, **options: Any) -> Kube:
        """Kubeconfig (given, $KUBECONFIG or ~/.kube/config) or the in-cluster ServiceAccount."""
        return cls.from_kubeconfig(kubeconfig, **options)

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str | None = None, **options: Any) -> Kube:
        """connect() without an event loop (reading a kubeconfig needs none)."""
        if (
            kubeconfig is None
            and os.environ.get("KUBERNETES_SERVICE_HOST")
            and not os.environ.get("KUBECONFIG")
        ):
            config = KubeConfig.from_service_account()
        else:
            path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            if os.pathsep in path:
                # kubectl merges a list of kubeconfigs; lightkube reads one file: say which.
                path = path.split(os.pathsep)[0]
                log.warning("KUBECONFIG names several files; reading only the first, %s", path)
            config = KubeConfig.from_file(path)
        return cls.from_config(config, **options)

    @classmethod
    def for_server(cls, url: str, **options: Any) -> Kube:
        """A client of a server that needs no credentials (tests' plain-HTTP stand-ins)."""
        return cls.from_config(KubeConfig.from_one(cluster=Cluster(server=url), user=User()), **options)

    @classmethod
    def from_config(cls, config: KubeConfig, **options: Any) -> Kube:
        single = config.get()
        if single is None:
            raise KubeError(0, "ConfigError", "the kubeconfig names no current context")
        # A burst of job creations must not queue behind a handful of pooled connections; the
        # API server handles many more concurrent requests than that.
        # No client-wide timeout to keep in step: every call and watch passes its own.
        params = ConnectionParams()
        http = httpx2.AsyncClient(
            **params.httpx_params(single),
            limits=httpx2.Limits(max_connections=64, max_keepalive_connections=32),
        )
        return cls(http=http, **options)

    async def close(self) -> None:
        await self.http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        attempts: int | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """One API call; retried on 429 / 5xx / timeouts / dropped connections after the server's
        Retry-After, else jittered exponential backoff (shardwise.kube.retry)."""
        policy = (
            self.policy if attempts is None else RetryPolicy(attempts=attempts, base_delay=self.base_delay)
        )
        headers = {"Accept": "application/json", "Content-Type": content_type}
        content = None if body is None else json.dumps(body).encode()
        for attempt in range(policy.attempts):
            try:
                response = await self.http.request(
                    method,
                    path,
                    params=dict(query or {}),
                    content=content,
                    headers=headers,
                    timeout=self.timeout_seconds if timeout is None else timeout,
                )
            except httpx2.TransportError as exc:
                # A dropped connection (the API server restarted, a proxy reset) is transient.
                if policy.retryable(None, attempt):
                    await self._wait(policy, attempt, f"{method} {path}: {exc!r}", None)
                    continue
                raise KubeError(0, type(exc).__name__, str(exc)) from None
            if response.status_code < 400:
                result = response.json() if response.content else {}
                return result if isinstance(result, dict) else {}
            if policy.retryable(response.status_code, attempt):
                await self._wait(
                    policy, attempt, f"{method} {path}: {response.status_code}", response.headers
                )
                continue
            raise KubeError(response.status_code, response.reason_phrase, response.text)
        raise AssertionError("unreachable")

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.attempts, base_delay=self.base_delay)

    async def _wait(self, policy: RetryPolicy, attempt: int, what: str, headers: Any) -> None:
        delay = policy.delay(attempt, dict(headers) if headers else None)
        log.info("retrying %s in %.2fs", what, delay)
        await asyncio.sleep(delay)

    async def watch(
        self, path: str, resource_version: str, *, timeout_seconds: int = 240
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of one watch from resource_version (bookmarks on), until the server ends it.

        Raises WatchExpiredError when the version is too old (410, as the response or as an ERROR
        event); the caller lists again. One request, not retried: a watch resumes from the last
        version its caller saw, which only the caller knows.
        """
        query = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        timeout = httpx2.Timeout(10.0, read=timeout_seconds + 30.0)
        request = self.http.build_request(
            "GET", path, params=query, headers={"Accept": "application/json"}, timeout=timeout
        )
        response = await self.http.send(request, stream=True)
        try:
            if response.status_code == 410:
                raise WatchExpiredError(path)
            if response.status_code >= 400:
                text = (await response.aread()).decode(errors="replace")
                raise KubeError(response.status_code, response.reason_phrase, text)
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    if status.get("code") == 410:
                        raise WatchExpiredError(path)
                    raise KubeError(int(status.get("code") or 500), "WatchError", json.dumps(status))
                yield event
        finally:
            await response.aclose()

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        return await self.request("POST", path, body=obj)

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        return await self.request("GET", resource_path(api_version, kind, namespace, name))

    async def get_path(self, path: str) -> dict[str, Any] | None:
        """The object at a REST path, None when there is none (404)."""
        try:
            return await self.request("GET", path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def merge_patch_path(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, body=patch, content_type=MERGE_PATCH)

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
        return await self.merge_patch_path(path, patch)

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
