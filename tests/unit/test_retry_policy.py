"""The one API client's retry policy (shardwise.kube.retry): Retry-After honoured, over real HTTP.

The pure part is table-driven; the client (shardwise.kube.client.Kube on lightkube, which the
operator and the node runner both use) runs against a real aiohttp server that throttles with
429 / 503 and a Retry-After header, so the wait is the one a real API server asks for, and that
ends watches the ways an API server does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web

from shardwise.kube.client import Kube, KubeError, WatchExpiredError
from shardwise.kube.retry import RetryPolicy, retry_after_seconds

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 12, 7, 6, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": " 1 "}, 1.0),  # header names are case-insensitive
        ({"Retry-After": "Mon, 07 Dec 2026 06:00:05 GMT"}, 5.0),  # an HTTP-date
        ({"Retry-After": "Mon, 07 Dec 2026 05:59:00 GMT"}, 0.0),  # a date past: at once
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-1"}, None),
        ({"Content-Type": "application/json"}, None),
        (None, None),
    ],
)
def test_retry_after_header(headers: dict[str, str] | None, expected: float | None) -> None:
    assert retry_after_seconds(headers, NOW) == expected


@pytest.mark.parametrize(
    ("status", "attempt", "retried"),
    [
        (429, 0, True), (503, 0, True), (500, 3, True), (502, 1, True), (504, 1, True), (None, 0, True),
        (503, 4, False),  # the budget (5 attempts) is spent
        (404, 0, False), (409, 0, False), (422, 0, False), (403, 0, False), (401, 0, False), (501, 0, False),
    ],
)  # fmt: skip
def test_what_is_retried(status: int | None, attempt: int, retried: bool) -> None:
    assert RetryPolicy(attempts=5).retryable(status, attempt) is retried


@pytest.mark.parametrize(
    ("attempt", "headers", "draw", "expected"),
    [
        (0, None, 0.5, 0.2),  # base delay, jitter at its middle
        (2, None, 0.5, 0.8),  # doubled per attempt
        (10, None, 0.5, 5.0),  # capped
        (0, None, 0.0, 0.1),  # jitter: half ...
        (1, None, 0.999, 0.5996),  # ... to one and a half
        (0, {"Retry-After": "7"}, 0.0, 7.0),  # the server's wait wins over the backoff
        (0, {"Retry-After": "3600"}, 0.5, 60.0),  # a confused server cannot stall us for an hour
    ],
)
def test_delay(attempt: int, headers: dict[str, str] | None, draw: float, expected: float) -> None:
    assert RetryPolicy().delay(attempt, headers, draw) == pytest.approx(expected)


class Throttling:
    """Answers the scripted (status, Retry-After) steps, then 200 with a Pod; records arrivals."""

    def __init__(self, script: list[tuple[int, str | None]]) -> None:
        self.script = list(script)
        self.arrivals: list[float] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        if self.script:
            status, retry_after = self.script.pop(0)
            headers = {"Retry-After": retry_after} if retry_after else {}
            return web.json_response({"kind": "Status", "code": status}, status=status, headers=headers)
        return web.json_response({"kind": "Pod", "metadata": {"name": "p"}})


async def serve(server: Throttling | Watching) -> tuple[web.AppRunner, int]:
    """Serves every path with ``server.handle`` on a free loopback port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def node_runner() -> ModuleType:
    sys.path.insert(0, str(ROOT / "hack"))
    spec = importlib.util.spec_from_file_location("node_runner", ROOT / "hack" / "node_runner.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("node_runner", module)
    spec.loader.exec_module(module)
    return module


async def operator_get(port: int) -> Any:
    # base_delay tiny: without Retry-After the retry would come back within milliseconds.
    kube = Kube.for_server(f"http://127.0.0.1:{port}", attempts=3, base_delay=0.001, timeout_seconds=5.0)
    try:
        return await kube.get("v1", "Pod", "ns", "p")
    except KubeError as exc:
        return exc
    finally:
        await kube.close()


async def runner_get(port: int) -> Any:
    """The node runner's way: a raw path, its own attempt budget for the call."""
    kube = Kube.for_server(f"http://127.0.0.1:{port}", base_delay=0.001, timeout_seconds=5.0)
    try:
        return await kube.request("GET", "/api/v1/namespaces/ns/pods/p", attempts=3)
    except KubeError as exc:
        return exc
    finally:
        await kube.close()


CLIENTS = {"operator": operator_get, "node-runner": runner_get}


def test_the_node_runner_uses_the_operator_client() -> None:
    module = node_runner()
    assert module.Kube is Kube and module.KubeError is KubeError


async def run(client: str, script: list[tuple[int, str | None]]) -> tuple[Any, Throttling]:
    server = Throttling(script)
    runner, port = await serve(server)
    try:
        return await CLIENTS[client](port), server
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize("status", [429, 503])
def test_the_client_waits_as_long_as_retry_after_asks(client: str, status: int) -> None:
    result, server = asyncio.run(run(client, [(status, "1")]))
    assert isinstance(result, dict) and result["metadata"]["name"] == "p"
    assert len(server.arrivals) == 2
    # The retry came no sooner than the server asked (the backoff alone would be ~1 ms).
    assert server.arrivals[1] - server.arrivals[0] >= 1.0


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_without_retry_after_the_client_backs_off_and_gives_up_after_the_budget(client: str) -> None:
    result, server = asyncio.run(run(client, [(503, None)] * 5))
    assert len(server.arrivals) == 3  # 3 attempts
    assert getattr(result, "status", None) == 503


class Watching:
    """Serves one watch: the scripted lines (JSON events), or a bare HTTP status."""

    def __init__(self, lines: list[dict[str, Any]] | None = None, status: int = 200) -> None:
        self.lines = lines or []
        self.status = status
        self.queries: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(dict(request.query))
        if self.status != 200:
            return web.json_response({"kind": "Status", "code": self.status}, status=self.status)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for line in self.lines:
            await response.write(json.dumps(line).encode() + b"\n")
        await response.write_eof()
        return response


async def watch(server: Watching) -> tuple[list[dict[str, Any]], BaseException | None]:
    runner, port = await serve(server)
    kube = Kube.for_server(f"http://127.0.0.1:{port}")
    events: list[dict[str, Any]] = []
    try:
        async for event in kube.watch("/api/v1/pods", "41", timeout_seconds=5):
            events.append(event)
    except (KubeError, WatchExpiredError) as exc:
        return events, exc
    finally:
        await kube.close()
        await runner.cleanup()
    return events, None


def test_a_watch_yields_events_and_bookmarks_until_the_server_ends_it() -> None:
    pod = {"kind": "Pod", "metadata": {"name": "p", "resourceVersion": "42"}}
    server = Watching([{"type": "ADDED", "object": pod}, {"type": "BOOKMARK", "object": pod}])
    events, error = asyncio.run(watch(server))
    assert error is None
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert server.queries == [
        {"watch": "1", "resourceVersion": "41", "allowWatchBookmarks": "true", "timeoutSeconds": "5"}
    ]


@pytest.mark.parametrize(
    "server",
    [
        Watching(status=410),  # the version is gone before the watch starts
        Watching([{"type": "ERROR", "object": {"kind": "Status", "code": 410}}]),  # ... or during it
    ],
    ids=["response", "event"],
)
def test_an_expired_watch_says_so_to_relist(server: Watching) -> None:
    _, error = asyncio.run(watch(server))
    assert isinstance(error, WatchExpiredError)


def test_a_watch_error_other_than_gone_is_raised_with_its_status() -> None:
    _, error = asyncio.run(watch(Watching([{"type": "ERROR", "object": {"kind": "Status", "code": 500}}])))
    assert isinstance(error, KubeError) and error.status == 500
