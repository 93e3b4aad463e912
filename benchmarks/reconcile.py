"""Reconcile benchmark: 50 ParallelTrainingJobs submitted at once on 100 KWOK GPU nodes.

Measures, on the project's own local control plane, the time from each job's create call
returning to all of its pods existing (median, p99, max), and the operator's peak RSS (VmHWM).
Writes benchmarks/results/reconcile.json and reconcile.md.

    python benchmarks/reconcile.py [--jobs 50] [--nodes 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tests.operator_process import running_operator  # noqa: E402

from cluster import LocalCluster  # noqa: E402
from shardwise.kube.client import Kube  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def job(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "shardwise.dev/v1alpha1",
        "kind": "ParallelTrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"preset": "llama-2-7b"},
            "training": {"method": "full", "sequenceLength": 4096, "globalBatchSize": 32},
            "resources": {"nodes": 2, "gpusPerNode": 8},
            "template": {"spec": {"containers": [{"name": "trainer", "image": "trainer:bench"}]}},
        },
    }


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def measure(kubeconfig: str, jobs: int) -> dict[str, Any]:
    kube = await Kube.connect(kubeconfig)
    namespace = "bench"
    await kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": namespace}})
    names = [f"bench-{i:03d}" for i in range(jobs)]
    created: dict[str, float] = {}

    async def submit(name: str) -> None:
        await kube.create(job(name, namespace))
        created[name] = time.monotonic()

    # A watch, not polling: a LIST of every pod many times a second would itself load the API
    # server that is being measured. It starts before the burst so no pod is seen late.
    complete: dict[str, float] = {}
    seen: dict[str, set[str]] = {}
    pods_path = f"/api/v1/namespaces/{namespace}/pods"
    listing = await kube.request("GET", pods_path)

    async def watch_pods() -> None:
        async for event in kube.watch(pods_path, listing["metadata"]["resourceVersion"], timeout_seconds=300):
            meta = (event.get("object") or {}).get("metadata") or {}
            owner = (meta.get("labels") or {}).get("shardwise.dev/job-name")
            if event.get("type") != "BOOKMARK" and owner and owner not in complete:
                seen.setdefault(owner, set()).add(meta["name"])
                if len(seen[owner]) == 2:
                    complete[owner] = time.monotonic()
            if len(complete) == jobs:
                return

    watcher = asyncio.create_task(watch_pods())
    await asyncio.sleep(1.0)
    submit_started = time.monotonic()
    await asyncio.gather(*(submit(n) for n in names))
    submit_seconds = time.monotonic() - submit_started
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(watcher, timeout=300)
    await kube.close()
    # A pod can appear before its job's create call has returned to us: never negative.
    latencies = [max(0.0, complete[n] - created[n]) for n in names if n in complete]
    return {
        "jobs": jobs,
        "jobs_with_all_pods": len(latencies),
        "submit_seconds": round(submit_seconds, 3),
        "create_to_all_pods_seconds": {
            "median": round(statistics.median(latencies), 3) if latencies else None,
            "p99": round(percentile(latencies, 0.99), 3) if latencies else None,
            "max": round(max(latencies), 3) if latencies else None,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--nodes", type=int, default=100)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with LocalCluster(gpu_nodes=args.nodes) as cluster:
        cluster.kubectl(
            "apply", "--server-side", "-f", str(ROOT / "crds" / "paralleltrainingjobs.shardwise.dev.yaml")
        )
        cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd/paralleltrainingjobs.shardwise.dev"
        )
        log = RESULTS / "reconcile-operator.log"
        log.unlink(missing_ok=True)
        with running_operator(cluster.kubeconfig, log) as op:
            idle_rss = peak_rss_bytes(op.process.pid)
            figures = asyncio.run(measure(str(cluster.kubeconfig), args.jobs))
            figures["operator_peak_rss_bytes"] = peak_rss_bytes(op.process.pid)
            figures["operator_idle_peak_rss_bytes"] = idle_rss
    figures["nodes"] = args.nodes
    figures["targets"] = {"p99_seconds": 2.0, "rss_bytes": 200 * 10**6}
    figures["machine"] = "2 cores, 24 GiB; control plane, KWOK and operator on the same machine"
    (RESULTS / "reconcile.json").write_text(json.dumps(figures, indent=2) + "\n")
    lat = figures["create_to_all_pods_seconds"]
    md = (
        "# Reconcile benchmark\n\n"
        f"{args.jobs} jobs (2 nodes × 8 GPUs each) submitted at once on {args.nodes} KWOK GPU nodes.\n\n"
        "| figure | value | target |\n|---|---|---|\n"
        f"| create → all pods, median | {lat['median']} s | |\n"
        f"| create → all pods, p99 | {lat['p99']} s | < 2 s |\n"
        f"| create → all pods, max | {lat['max']} s | |\n"
        f"| operator peak RSS (VmHWM) | {figures['operator_peak_rss_bytes'] / 1e6:.1f} MB | < 200 MB |\n"
        f"| operator RSS before the burst | {figures['operator_idle_peak_rss_bytes'] / 1e6:.1f} MB | |\n"
        f"| jobs with all pods | {figures['jobs_with_all_pods']} / {args.jobs} | |\n\n"
        f"Machine: {figures['machine']}. Pods seen through a watch.\n"
    )
    (RESULTS / "reconcile.md").write_text(md)
    print(md)
    return 0 if figures["jobs_with_all_pods"] == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
