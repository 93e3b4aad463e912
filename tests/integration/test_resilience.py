"""The operator against a misbehaving API server: a restarted kube-apiserver (every watch
breaks) and transient errors (429 / 5xx / timeouts) are survived, not fatal."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from tests.jobs import Kubectl, condition_is, job_manifest, wait_for
from tests.operator_process import OperatorProcess

from shardwise.kube.client import Kube, KubeError

pytestmark = pytest.mark.integration


def test_the_watch_recovers_after_the_api_server_restarts(
    cluster: Any, kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(job_manifest("before", namespace, resources={"nodes": 1, "gpusPerNode": 1}))
    wait_for("the first job's pod", lambda: kubectl.pods(namespace, "before"), timeout=60)

    # Kill kube-apiserver: every watch stream of the operator breaks mid-flight.
    pid = cluster.pids()["kube-apiserver"]
    os.kill(pid, signal.SIGKILL)
    wait_for("the old API server gone", lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), timeout=30)
    time.sleep(1)  # the kernel releases its listening socket
    cluster.up()  # idempotent: starts only what is missing
    assert operator.process.poll() is None, "the operator must survive a lost API server"

    kubectl.apply(job_manifest("after", namespace, resources={"nodes": 1, "gpusPerNode": 1}))
    wait_for(
        "a job created after the restart gets its pod", lambda: kubectl.pods(namespace, "after"), timeout=120
    )
    wait_for(
        "both jobs planned",
        lambda: all(condition_is(kubectl.job(namespace, n), "Planned", "True") for n in ("before", "after")),
        timeout=60,
    )


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


class FlakyServer:
    """An HTTP server answering each path with a scripted list of statuses, then 200."""

    def __init__(self, script: list[int | str]) -> None:
        self.script = list(script)
        self.calls = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        step = self.script.pop(0) if self.script else 200
        if step == "hang":
            await asyncio.sleep(5)
            step = 200
        assert isinstance(step, int)
        body = {"kind": "Status", "code": step} if step != 200 else {"kind": "Pod", "metadata": {"name": "p"}}
        return web.json_response(body, status=step)


async def _call(script: list[int | str], attempts: int = 5) -> tuple[dict[str, Any] | KubeError, int]:
    server = FlakyServer(script)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    kube = Kube.for_server(
        f"http://127.0.0.1:{port}", attempts=attempts, base_delay=0.01, timeout_seconds=1.0
    )
    try:
        result: dict[str, Any] | KubeError = await kube.get("v1", "Pod", "ns", "p")
    except KubeError as exc:
        result = exc
    finally:
        await kube.close()
        await runner.cleanup()
    return result, server.calls


@pytest.mark.parametrize(
    ("script", "calls"),
    [([429, 200], 2), ([503, 500, 502, 504], 5), (["hang", 200], 2)],
    ids=["too-many-requests", "server-errors", "timeout"],
)
def test_transient_api_errors_are_retried_with_backoff(script: list[int | str], calls: int) -> None:
    result, made = asyncio.run(_call(script))
    assert isinstance(result, dict) and result["metadata"]["name"] == "p"
    assert made == calls


@pytest.mark.parametrize(("status", "calls"), [(404, 1), (409, 1), (422, 1), (403, 1)])
def test_errors_retrying_cannot_fix_are_raised_at_once(status: int, calls: int) -> None:
    result, made = asyncio.run(_call([status]))
    assert isinstance(result, KubeError) and result.status == status
    assert made == calls


def test_retries_stop_after_the_budget() -> None:
    result, made = asyncio.run(_call([503] * 10, attempts=3))
    assert isinstance(result, KubeError) and result.status == 503
    assert made == 3
