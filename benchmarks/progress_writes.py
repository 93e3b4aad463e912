"""Progress-write benchmark: 50 running jobs whose pods serve synthetic trainer stats, for 5 minutes.

On the project's local control plane (KWOK GPU nodes) with a real `shardwise operator`: 50 jobs
(2 nodes × 8 GPUs each) start, KWOK runs their pods, and this script gives every pod a loopback
address of its own (status.podIP patched to 127.77.x.y) where one in-process aiohttp server
answers the operator's scrape with a trainer stats page (shardwise_trainer.metrics.render) of
16 ranks whose step advances by one per second. Over the measured window it reads the API
server's apiserver_request_total before and after and reports:

* status writes per job per minute (PATCH paralleltrainingjobs/status: only the operator writes
  them), against the --progress-interval bound;
* API requests per second by verb and resource over the window (KWOK and the controllers
  included; the rows the operator alone makes are marked), and the operator's total.

    python benchmarks/progress_writes.py [--jobs 50] [--minutes 5] [--progress-interval 30]

Writes benchmarks/results/progress_writes.json and progress_writes.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "trainer_image")]

from aiohttp import web  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tests.operator_process import running_operator  # noqa: E402

from cluster import LocalCluster  # noqa: E402
from shardwise.kube.client import Kube  # noqa: E402
from shardwise.resources.names import TRAINER_METRICS_PORT  # noqa: E402
from shardwise_trainer import metrics as trainer_metrics  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NAMESPACE = "bench-progress"
GPUS_PER_NODE, NODES, TOTAL_STEPS = 8, 2, 100_000


def job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "shardwise.dev/v1alpha1",
        "kind": "ParallelTrainingJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {"preset": "llama-2-7b"},
            "training": {"method": "full", "sequenceLength": 4096, "globalBatchSize": 32},
            "resources": {"nodes": NODES, "gpusPerNode": GPUS_PER_NODE},
            "monitoring": {"scrapeIntervalSeconds": 5},
            "template": {"spec": {"containers": [{"name": "trainer", "image": "trainer:bench"}]}},
        },
    }


class Pages:
    """The trainer stats of every pod, by the loopback address it was given."""

    def __init__(self) -> None:
        self.pods: dict[str, tuple[str, str, int]] = {}  # ip -> (job, pod, node rank)
        self.started = time.time()
        self.served = 0

    def page(self, ip: str) -> str:
        job, pod, node_rank = self.pods[ip]
        now = time.time()
        step = 1 + int(now - self.started)
        stats = []
        for local in range(GPUS_PER_NODE):
            rank = node_rank * GPUS_PER_NODE + local
            labels = {"namespace": NAMESPACE, "job": job, "pod": pod, "node": pod, "rank": rank,
                      "local_rank": local, "gpu": local, "stage": 0}  # fmt: skip
            stats.append(
                {
                    "labels": labels, "step": step, "total_steps": TOTAL_STEPS, "tokens_per_step": 131072,
                    "samples_per_step": 32, "step_seconds": 0.95, "wait_seconds": 0.05,
                    "compute_seconds": 0.7, "communication_seconds": 0.25, "tokens_per_second": 8192.0,
                    "loss": 2.0 + 1.0 / step, "memory_bytes": {"peak_reserved": 60e9, "device_total": 80e9},
                    "model_state_bytes": 40e9, "last_update_timestamp_seconds": now,
                }
            )  # fmt: skip
        self.served += 1
        return trainer_metrics.render(stats)

    async def handle(self, request: web.Request) -> web.Response:
        ip = request.transport.get_extra_info("sockname")[0] if request.transport else ""
        if ip not in self.pods:
            return web.Response(status=404)
        return web.Response(text=self.page(ip), content_type="text/plain")


async def serve(pages: Pages, ips: list[str]) -> web.AppRunner:
    app = web.Application()
    app.router.add_get("/metrics", pages.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for ip in ips:
        await web.TCPSite(runner, ip, TRAINER_METRICS_PORT).start()
    return runner


def request_counts(cluster: LocalCluster) -> dict[tuple[str, str, str], float]:
    """apiserver_request_total summed by (verb, resource, subresource)."""
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(cluster.kubectl("get", "--raw", "/metrics")):
        if family.name != "apiserver_request":
            continue
        for s in family.samples:
            if s.name != "apiserver_request_total":
                continue
            key = (s.labels.get("verb", ""), s.labels.get("resource", ""), s.labels.get("subresource", ""))
            out[key] = out.get(key, 0.0) + s.value
    return out


async def measure(cluster: LocalCluster, jobs: int, minutes: float) -> dict[str, Any]:
    kube = await Kube.connect(str(cluster.kubeconfig))
    await kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": NAMESPACE}})
    names = [f"prog-{i:03d}" for i in range(jobs)]
    await asyncio.gather(*(kube.create(job(n)) for n in names))
    pages = Pages()
    ips: list[str] = []
    deadline = time.monotonic() + 300
    while len(pages.pods) < jobs * NODES and time.monotonic() < deadline:
        for pod in await kube.list("v1", "Pod", NAMESPACE):
            meta, status = pod["metadata"], pod.get("status") or {}
            name = meta["name"]
            if status.get("phase") != "Running" or any(v[1] == name for v in pages.pods.values()):
                continue
            index = len(ips)
            ip = f"127.77.{index // 250}.{index % 250 + 1}"
            job_name = meta["labels"]["shardwise.dev/job-name"]
            node_rank = int(name.rsplit("-", 1)[1])
            body = {"status": {"podIP": ip, "podIPs": [{"ip": ip}]}}
            await kube.merge_patch("v1", "Pod", NAMESPACE, name, body, subresource="status")
            pages.pods[ip] = (job_name, name, node_rank)
            ips.append(ip)
        await asyncio.sleep(2)
    runner = await serve(pages, ips)
    await asyncio.sleep(30)  # warm-up: every job scraped and its first progress written
    before, t0 = request_counts(cluster), time.monotonic()
    served0 = pages.served
    await asyncio.sleep(minutes * 60)
    after, seconds = request_counts(cluster), time.monotonic() - t0
    served = pages.served - served0
    still = [
        p
        for p in await kube.list("v1", "Pod", NAMESPACE)
        if (p.get("status") or {}).get("podIP") in pages.pods
    ]
    jobs_now = await kube.list("shardwise.dev/v1alpha1", "ParallelTrainingJob", NAMESPACE)
    with_progress = [j for j in jobs_now if (j.get("status") or {}).get("progress")]
    await runner.cleanup()
    await kube.close()
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    status_writes = sum(v for (verb, res, sub), v in delta.items()
                        if verb == "PATCH" and res == "paralleltrainingjobs" and sub == "status")  # fmt: skip
    rows = sorted(((k, v / seconds) for k, v in delta.items() if v > 0), key=lambda kv: -kv[1])
    return {
        "jobs": jobs,
        "pods": len(pages.pods),
        "pods_keeping_their_loopback_ip": len(still),
        "jobs_with_progress": len(with_progress),
        "window_seconds": round(seconds, 1),
        "scrapes_served": served,
        "scrapes_per_second": round(served / seconds, 2),
        "status_writes": status_writes,
        "status_writes_per_job_per_minute": round(status_writes / jobs / (seconds / 60), 3),
        "requests_per_second": {f"{v} {r}{'/' + s if s else ''}": round(rate, 3) for (v, r, s), rate in rows},
        "total_requests_per_second": round(sum(rate for _, rate in rows), 3),
        "ptj_requests_per_second": round(
            sum(rate for (_, r, _), rate in rows if r == "paralleltrainingjobs"), 3
        ),
    }


def write_md(f: dict[str, Any]) -> str:
    shorter = " (a shorter run than 5 minutes)" if f["minutes"] < 5 else ""
    lines = [
        "# Progress writes: 50 running jobs",
        "",
        f"{f['jobs']} jobs (2 nodes × 8 GPUs) running on KWOK nodes; each pod's stats page synthetic "
        "(16 ranks, a step per second, served in-process on its own loopback address), scraped by a "
        "real `shardwise operator` every 5 s (spec.monitoring.scrapeIntervalSeconds) with "
        f"`--progress-interval {f['progress_interval']}`. Window: {f['window_seconds']} s after a 30 s "
        f"warm-up{shorter}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| status writes per job per minute (PATCH ptj/status) | {f['status_writes_per_job_per_minute']} |",
        f"| bound from --progress-interval | {60 / f['progress_interval']:.2f} |",
        f"| status writes in the window | {f['status_writes']:.0f} |",
        f"| ParallelTrainingJob requests per second (the operator's) | {f['ptj_requests_per_second']} |",
        f"| all API requests per second (KWOK and controllers included) | {f['total_requests_per_second']} |",
        f"| stats pages served per second (operator scrapes) | {f['scrapes_per_second']} |",
        f"| jobs with status.progress at the end | {f['jobs_with_progress']} / {f['jobs']} |",
        f"| pods still on their loopback address | {f['pods_keeping_their_loopback_ip']} / {f['pods']} |",
        "",
        "API requests per second over the window, by verb and resource (apiserver_request_total):",
        "",
        "| verb resource[/subresource] | per second |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in f["requests_per_second"].items()),
        "",
        f"Machine: {f['machine']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--progress-interval", type=float, default=30.0)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with LocalCluster(gpu_nodes=args.jobs * NODES) as cluster:
        cluster.kubectl(
            "apply", "--server-side", "-f", str(ROOT / "crds" / "paralleltrainingjobs.shardwise.dev.yaml")
        )
        cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=180s", "crd/paralleltrainingjobs.shardwise.dev"
        )
        log = RESULTS / "progress_writes-operator.log"
        log.unlink(missing_ok=True)
        with running_operator(cluster.kubeconfig, log, "--progress-interval", str(args.progress_interval)):
            figures = asyncio.run(measure(cluster, args.jobs, args.minutes))
    machine = "2 cores shared with other work; control plane, KWOK and operator on the same machine"
    figures.update(progress_interval=args.progress_interval, minutes=args.minutes, machine=machine)
    (RESULTS / "progress_writes.json").write_text(json.dumps(figures, indent=2) + "\n")
    md = write_md(figures)
    (RESULTS / "progress_writes.md").write_text(md)
    print(md)
    return 0 if figures["jobs_with_progress"] == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
