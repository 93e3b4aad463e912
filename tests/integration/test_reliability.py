"""Operator reliability against the real control plane (issue 20): each test reproduces one defect.

Resize after suspend, training changes between attempts, pods the API server refuses, metric
series of deleted jobs, hostile stats pages, pods stuck Terminating on a lost node, and Events
whose POST timed out. The operator is a real subprocess of this module (short backoff, liveness
endpoint on, a stats byte cap the tests exercise); nothing of the Kubernetes API is mocked.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, TCPConnector, web
from tests.jobs import Kubectl, condition, condition_is, job_manifest, wait_for
from tests.operator_process import OperatorProcess, free_port, running_operator

from shardwise.kube.client import Kube
from shardwise.kube.events import post_event

pytestmark = pytest.mark.integration

TIMEOUT = 90
STATS_MAX_BYTES = 8_000_000  # above the 6 MB bogus page (parsed off the loop), below a stream


@pytest.fixture(scope="module")
def liveness_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def operator(
    cluster: Any, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory, liveness_port: int
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    args = ["--restart-backoff-seconds", "1", "--liveness-port", str(liveness_port)]
    args += ["--stats-max-bytes", str(STATS_MAX_BYTES)]
    with running_operator(cluster.kubeconfig, log, *args) as op:
        yield op
    print(op.log()[-20000:])


def small_job(name: str, namespace: str, nodes: int = 1, gpus: int = 2, **spec: Any) -> dict[str, Any]:
    return job_manifest(name, namespace, resources={"nodes": nodes, "gpusPerNode": gpus}, **spec)


def patch_spec(kubectl: Kubectl, namespace: str, name: str, spec: dict[str, Any]) -> None:
    kubectl("patch", "ptj", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": spec}))


def attempt_pods(kubectl: Kubectl, namespace: str, name: str, attempt: int) -> list[dict[str, Any]]:
    return [
        p
        for p in kubectl.pods(namespace, name)
        if p["metadata"]["labels"].get("shardwise.dev/attempt") == str(attempt)
        and not p["metadata"].get("deletionTimestamp")
    ]


def running(kubectl: Kubectl, namespace: str, name: str, attempt: int, count: int) -> list[dict[str, Any]]:
    def probe() -> list[dict[str, Any]] | None:
        pods = attempt_pods(kubectl, namespace, name, attempt)
        ok = len(pods) == count and all(p["status"].get("phase") == "Running" for p in pods)
        return pods if ok else None

    return list(wait_for(f"{name} attempt {attempt}: {count} pod(s) running", probe, timeout=TIMEOUT))


def layout_document(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    cm = kubectl.json("get", "configmap", f"{name}-layout", "-n", namespace)
    return dict(json.loads(cm["data"]["layout.json"]))


def assert_one_plan(kubectl: Kubectl, namespace: str, name: str, global_batch: int) -> None:
    """The ConfigMap's layout.json and status.layout are the same plan, of the current spec."""
    job = kubectl.job(namespace, name)
    status, doc = job["status"]["layout"], layout_document(kubectl, namespace, name)
    lay = doc["layout"]
    assert doc["training"]["global_batch_size"] == global_batch
    assert lay["micro_batch"] * lay["grad_accum"] * lay["dp"] == global_batch
    assert (status["microBatchSize"], status["gradientAccumulation"], status["data"]) == (
        lay["micro_batch"],
        lay["grad_accum"],
        lay["dp"],
    )
    planned = condition(job, "Planned")
    assert planned is not None and planned["observedGeneration"] == job["metadata"]["generation"]


# -- 1. resize after suspend ---------------------------------------------------------------------


def test_a_job_resized_while_suspended_is_replanned_on_resume(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(small_job("resize", namespace, nodes=1, gpus=2))
    running(kubectl, namespace, "resize", 0, 1)
    patch_spec(kubectl, namespace, "resize", {"runPolicy": {"suspend": True}})
    wait_for(
        "Suspended",
        lambda: condition_is(kubectl.job(namespace, "resize"), "Suspended", "True"),
        timeout=TIMEOUT,
    )
    # Allowed by the CRD while Suspended=True: the way to resize a started job.
    patch_spec(kubectl, namespace, "resize", {"resources": {"nodes": 2, "gpusPerNode": 4}})
    patch_spec(kubectl, namespace, "resize", {"runPolicy": {"suspend": False}})

    pods = running(kubectl, namespace, "resize", 1, 2)
    assert [p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for p in pods] == ["4", "4"]
    job = kubectl.job(namespace, "resize")
    assert (job["status"]["layout"]["nodes"], job["status"]["layout"]["gpusPerNode"]) == (2, 4)
    planned = condition(job, "Planned")
    assert planned is not None
    assert (
        planned["observedGeneration"] == job["metadata"]["generation"] == job["status"]["observedGeneration"]
    )
    assert layout_document(kubectl, namespace, "resize")["layout"]["nodes"] == 2


# -- 2. training changes between attempts --------------------------------------------------------


def test_a_training_change_reaches_the_next_attempt_from_one_plan(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    training = {"method": "full", "precision": "bf16", "sequenceLength": 4096, "globalBatchSize": 16}
    kubectl.apply(small_job("retune", namespace, training=training))
    pods = running(kubectl, namespace, "retune", 0, 1)
    assert_one_plan(kubectl, namespace, "retune", 16)

    for attempt, batch in ((1, 64), (2, 128)):
        patch_spec(kubectl, namespace, "retune", {"training": {"globalBatchSize": batch}})
        kubectl.exit_pod(namespace, pods[0]["metadata"]["name"], 137, "OOMKilled")  # a retryable restart
        pods = running(kubectl, namespace, "retune", attempt, 1)
        assert_one_plan(kubectl, namespace, "retune", batch)

    # Children deleted under the running attempt come back while it runs, from the same plan.
    kubectl("delete", "configmap", "retune-layout", "-n", namespace)
    kubectl("delete", "service", "retune", "-n", namespace)
    wait_for(
        "ConfigMap and Service restored",
        lambda: (
            kubectl.try_json("get", "configmap", "retune-layout", "-n", namespace)
            and kubectl.try_json("get", "service", "retune", "-n", namespace)
        ),
        timeout=30,
    )
    assert_one_plan(kubectl, namespace, "retune", 128)
    assert kubectl.job(namespace, "retune")["status"]["attempt"] == 2  # restored, not restarted


# -- 3. pods the API server refuses --------------------------------------------------------------


def test_a_quota_refused_rank_backs_off_with_the_quota_message(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "gpus", "namespace": namespace},
        "spec": {"hard": {"requests.nvidia.com/gpu": "6"}},
    }
    kubectl.apply(quota)
    wait_for(
        "quota computed",
        lambda: (kubectl.json("get", "resourcequota", "gpus", "-n", namespace).get("status") or {}).get(
            "hard"
        ),
        timeout=60,
    )
    kubectl.apply(small_job("quota", namespace, nodes=2, gpus=4))  # 8 GPUs: rank 1 is refused
    started = time.monotonic()
    job = wait_for(
        "PodCreateFailed",
        lambda: (
            condition_is(j := kubectl.job(namespace, "quota"), "Running", "False", "PodCreateFailed") and j
        ),
        timeout=TIMEOUT,
    )
    message = condition(job, "Running")["message"]  # type: ignore[index]
    assert "exceeded quota" in message and "requests.nvidia.com/gpu" in message

    time.sleep(max(0.0, 20 - (time.monotonic() - started)))
    job = kubectl.job(namespace, "quota")
    events = kubectl.events(namespace, "quota")
    refused = [e for e in events if e["reason"] == "PodCreateFailed"]
    attempts = int(job["status"].get("attempt") or 0)
    print(f"quota: {attempts} attempts, {len(events)} Events ({len(refused)} PodCreateFailed) in 20 s")
    # Base backoff 1 s doubling, jittered over [d/2, 3d/2): at most ~6 tries in 20 s.
    assert 1 <= attempts <= 8, attempts
    assert 1 <= len(refused) <= 8 and len(events) <= 30
    assert "exceeded quota" in refused[0]["message"]
    assert job["status"]["createFailures"] == attempts
    assert job["status"].get("restarts", 0) == 0
    assert job["status"]["phase"] == "Pending"
    # No partial gang holds GPUs while the job waits out its backoff.
    wait_for(
        "no live pod while waiting",
        lambda: (
            not [p for p in kubectl.pods(namespace, "quota") if not p["metadata"].get("deletionTimestamp")]
            or None
        ),
        timeout=30,
        interval=0.2,
    )


# -- 4. series of deleted jobs -------------------------------------------------------------------


def job_series(metrics: str, namespace: str) -> list[str]:
    return [line for line in metrics.splitlines() if f'namespace="{namespace}"' in line]


def jobs_gauge(metrics: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("shardwise_jobs{")
    )


def test_created_completed_deleted_jobs_leave_no_series(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    batch, cycles = 10, 5
    for cycle in range(cycles):
        names = [f"ttl-{cycle}-{i}" for i in range(batch)]
        items = [small_job(n, namespace, gpus=1, runPolicy={"ttlSecondsAfterFinished": 0}) for n in names]
        kubectl.apply({"apiVersion": "v1", "kind": "List", "items": items})

        def all_running(names: list[str] = names) -> bool:
            pods = kubectl.json("get", "pods", "-n", namespace)["items"]
            up = {
                p["metadata"]["labels"].get("shardwise.dev/job-name")
                for p in pods
                if p["status"].get("phase") == "Running"
            }
            return set(names) <= up

        wait_for(f"batch {cycle} running", all_running, timeout=TIMEOUT)
        time.sleep(1.5)  # the scrape loop picks the running jobs up (and scrapes their pods)
        kubectl("annotate", "pods", "-n", namespace, "--all", "kwok.shardwise.dev/exit-code=0", "--overwrite")
        wait_for(
            f"batch {cycle} deleted",
            lambda: not kubectl.json("get", "ptj", "-n", namespace)["items"],
            timeout=TIMEOUT,
        )
    time.sleep(4)  # longer than a scrape's timeout: every scrape in flight has ended
    metrics = operator.metrics()
    left = job_series(metrics, namespace)
    every = kubectl.json("get", "ptj", "--all-namespaces")["items"]
    print(
        f"{batch * cycles} jobs: {len(left)} series left;"
        f" shardwise_jobs {jobs_gauge(metrics)} for {len(every)} jobs"
    )
    assert left == []
    assert jobs_gauge(metrics) == len(every)


# -- 6. a pod stuck Terminating on a lost node -----------------------------------------------------


def silent_node(name: str, product: str) -> dict[str, Any]:
    """A Ready GPU node no kubelet (and no KWOK) serves: its pods end only if someone force-deletes
    them, as on a real node that stopped answering."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    resources = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "2"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "nvidia.com/gpu.product": product,
                "nvidia.com/gpu.memory": "81559",
                "nvidia.com/gpu.count": "2",
            },
        },
        "status": {
            "capacity": resources,
            "allocatable": dict(resources),
            "conditions": [
                {
                    "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "ready",
                    "lastHeartbeatTime": now, "lastTransitionTime": now,
                }
            ],
        },
    }  # fmt: skip


def set_ready(kubectl: Kubectl, node: str, ready: bool) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    condition = {
        "type": "Ready", "status": "True" if ready else "False",
        "reason": "KubeletReady" if ready else "NodeStatusUnknown", "message": "set by the test",
        "lastHeartbeatTime": now, "lastTransitionTime": now,
    }  # fmt: skip
    kubectl(
        "patch", "node", node, "--subresource=status", "--type=strategic",
        "-p", json.dumps({"status": {"conditions": [condition]}}),
    )  # fmt: skip


def test_a_pod_stuck_terminating_on_a_notready_node_does_not_block_the_next_attempt(
    cluster: Any, kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    product = "NVIDIA-SILENT-80GB"  # only this test's nodes carry it
    silent = f"silent-{namespace}"
    kubectl("create", "-f", "-", stdin=json.dumps(silent_node(silent, product)))
    spare: list[str] = []
    try:
        wait_for(
            "the silent node schedulable",
            lambda: not (kubectl.json("get", "node", silent)["spec"].get("taints")),
            timeout=60,
        )
        resources = {"nodes": 1, "gpusPerNode": 2, "gpuProduct": product}
        kubectl.apply(job_manifest("lost", namespace, resources=resources))
        pod = wait_for(
            "the pod bound to the silent node",
            lambda: [p for p in kubectl.pods(namespace, "lost") if p["spec"].get("nodeName") == silent],
            timeout=TIMEOUT,
        )[0]
        name = pod["metadata"]["name"]
        # What its kubelet would have reported before it fell silent: the gang runs.
        kubectl(
            "patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"phase": "Running", "podIP": "10.99.0.1"}}),
        )  # fmt: skip
        wait_for(
            "Running",
            lambda: kubectl.job(namespace, "lost")["status"].get("phase") == "Running",
            timeout=TIMEOUT,
        )
        spare = cluster.add_gpu_nodes(1, gpus_per_node=2, gpu_product=product, prefix="spare")
        # The node is lost: its pod can never end by itself. The taint is what the node lifecycle
        # controller adds for Ready=False (set here at once, so nothing new lands there meanwhile).
        kubectl("taint", "node", silent, "node.kubernetes.io/not-ready:NoSchedule")
        set_ready(kubectl, silent, False)

        (after,) = running(kubectl, namespace, "lost", 1, 1)
        assert after["spec"]["nodeName"] == spare[0]
        job = kubectl.job(namespace, "lost")
        assert job["status"].get("restarts", 0) == 0  # a disruption: the budget is not spent
        forced = [e for e in kubectl.events(namespace, "lost") if e["reason"] == "PodForceDeleted"]
        assert len(forced) == 1 and silent in forced[0]["message"]
    finally:
        kubectl("delete", "nodes", silent, *spare, "--wait=false")


# -- 7. an Event POST that timed out -------------------------------------------------------------


async def _post_through_a_slow_proxy(cluster: Any, namespace: str) -> int:
    """post_event through a proxy that forwards the first Event POST but answers only after the
    client's timeout: the retry must not create a second Event."""
    config = json.loads(Path(cluster.kubeconfig).read_text())
    user = config["users"][0]["user"]
    ctx = ssl.create_default_context(cafile=config["clusters"][0]["cluster"]["certificate-authority"])
    ctx.load_cert_chain(user["client-certificate"], user["client-key"])
    upstream = ClientSession(connector=TCPConnector(ssl=ctx))
    slowed = 0

    async def forward(request: web.Request) -> web.Response:
        nonlocal slowed
        body = await request.read()
        async with upstream.request(
            request.method, cluster.server + request.path_qs, data=body,
            headers={k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept")},
        ) as answer:  # fmt: skip
            payload = await answer.read()
            status = answer.status
        if request.method == "POST" and request.path.endswith("/events") and not slowed:
            slowed += 1
            await asyncio.sleep(2.5)  # written upstream; the client gave up after 1 s
        return web.Response(body=payload, status=status, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    kube = Kube.for_server(f"http://127.0.0.1:{port}", attempts=3, base_delay=0.05, timeout_seconds=1.0)
    job = {"metadata": {"name": "ghost", "namespace": namespace, "uid": "0000"}}
    try:
        await post_event(kube, job, "Normal", "Probe", "posted once")
    finally:
        await kube.close()
        await upstream.close()
        await runner.cleanup()
    return slowed


def test_an_event_post_that_timed_out_is_posted_once(cluster: Any, kubectl: Kubectl, namespace: str) -> None:
    assert asyncio.run(_post_through_a_slow_proxy(cluster, namespace)) == 1
    events = [e for e in kubectl.events(namespace, "ghost") if e["reason"] == "Probe"]
    print(f"event: {len(events)} Event(s) for one post")
    assert len(events) == 1


# -- 5. hostile stats pages ----------------------------------------------------------------------


class _Stats(BaseHTTPRequestHandler):
    """Serves what the server's `mode` says: an endless stream or 100 000 bogus series."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        mode = getattr(self.server, "mode", "")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        if mode == "bogus":
            body = getattr(self.server, "body", b"")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.end_headers()  # no length: read until the connection closes, which it never does
        line = b'shardwise_trainer_step_seconds{rank="0",pod="p"} 1\n' * 4096
        try:
            while True:  # ~40 MB/s: enough to fill memory, not to starve this machine
                self.wfile.write(line)
                time.sleep(0.005)
        except OSError:
            return

    def log_message(self, format: str, *args: Any) -> None:
        del format, args


def _serve(address: str, mode: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((address, 9400), _Stats)
    server.daemon_threads = True
    server.mode = mode  # type: ignore[attr-defined]
    server.body = b"# TYPE shardwise_trainer_step_seconds gauge\n" + b"".join(  # type: ignore[attr-defined]
        f'shardwise_trainer_step_seconds{{rank="-{i}",pod="p",node="n"}} 1.0\n'.encode()
        for i in range(1, 100_001)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _rss_bytes(pid: int) -> int:
    """Resident memory of the process and its children (the operator's stats parser)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return total
    return total + sum(_rss_bytes(int(child)) for child in children)


def test_a_stats_page_cannot_stall_or_bloat_the_operator(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str, liveness_port: int
) -> None:
    kubectl.apply(small_job("stats", namespace, nodes=2, gpus=1, monitoring={"scrapeIntervalSeconds": 1}))
    pods = running(kubectl, namespace, "stats", 0, 2)
    wait_for(
        "Running",
        lambda: kubectl.job(namespace, "stats")["status"].get("phase") == "Running",
        timeout=TIMEOUT,
    )
    endless, bogus = _serve("127.0.0.2", "endless"), _serve("127.0.0.3", "bogus")
    try:
        baseline = _rss_bytes(operator.process.pid)
        for pod, ip in zip(pods, ("127.0.0.2", "127.0.0.3"), strict=True):
            status = {"status": {"podIP": ip, "podIPs": [{"ip": ip}]}}
            kubectl(
                "patch", "pod", pod["metadata"]["name"], "-n", namespace, "--subresource=status",
                "--type=merge", "-p", json.dumps(status),
            )  # fmt: skip
        # The liveness endpoint is served on the operator's event loop: its latency is the loop's lag.
        lags: list[float] = []
        peak = baseline
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sent = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=60) as response:
                response.read()
            lags.append(time.monotonic() - sent)
            peak = max(peak, _rss_bytes(operator.process.pid))
            time.sleep(0.05)
    finally:
        for server in (endless, bogus):
            server.shutdown()
            server.server_close()
    metrics = operator.metrics()
    growth = (peak - baseline) / 2**20
    print(f"stats: max /healthz latency {max(lags):.3f} s over {len(lags)} probes; RSS +{growth:.0f} MiB")
    assert max(lags) < 1.0, f"event loop stalled {max(lags):.2f} s"
    assert growth < 300, f"operator RSS grew by {growth:.0f} MiB"
    rejections = {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("shardwise_operator_scrape_rejections_total{")
    }
    assert rejections.get("too_large", 0) >= 1 and rejections.get("rank_out_of_range", 0) >= 100_000
    reporting = [
        line for line in job_series(metrics, namespace) if line.startswith("shardwise_job_ranks_reporting")
    ]
    assert all(float(line.rsplit(" ", 1)[1]) <= 2 for line in reporting)  # no window for a bogus rank
    errors = [
        line for line in job_series(metrics, namespace) if line.startswith("shardwise_scrape_errors_total")
    ]
    assert {p["metadata"]["name"] for p in pods} <= {line.split('pod="')[1].split('"')[0] for line in errors}
