"""Observability end to end: a real Prometheus scrapes the operator while a job trains with one
rank slowed by the trainer's test switch; PromQL sees the straggler, the job gets the condition,
every GPU has memory series, and the job's series go when the job is deleted."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.cluster import in_ci
from tests.e2e.jobs_e2e import tiny_job
from tests.jobs import Kubectl, condition, wait_for
from tests.operator_process import free_port

pytestmark = pytest.mark.e2e

SLOW_RANK, SLOW_FACTOR = 1, 2.0
CHART = Path(__file__).resolve().parents[2] / "charts" / "shardwise"
RULES = CHART / "files" / "prometheus-rules.yaml"
BOARDS = CHART / "dashboards"


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.process, self.log = url, process, log

    def query(self, promql: str) -> list[dict[str, Any]]:
        with urllib.request.urlopen(
            f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout=5
        ) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return list(body["data"]["result"])


@pytest.fixture(scope="module")
def prometheus(shardwise_operator: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        if in_ci():
            pytest.fail("Debian prometheus is not installed (hack/setup installs it)")
        pytest.skip("prometheus not installed; run hack/setup")
    workdir = tmp_path_factory.mktemp("prometheus")
    target = shardwise_operator.metrics_url.removeprefix("http://").removesuffix("/metrics")
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: shardwise-operator\n"
        "    honor_labels: true  # our series carry their own job / namespace / pod labels\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    log = workdir / "prometheus.log"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_for("Prometheus ready", lambda: _ready(prom), timeout=60)
        yield prom
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def exposed_names(text: str) -> set[str]:
    """Metric names in an exposition, with the sample names a TYPE line implies."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "counter":
                names.add(f"{name}_total")
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


def dashboard_and_rule_metrics() -> set[str]:
    """Every metric name the dashboards and rules query, recording rules' own names excluded."""
    rules = yaml.safe_load(RULES.read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    for board in BOARDS.glob("*.json"):
        exprs += re.findall(r'"expr":\s*"((?:[^"\\]|\\.)*)"', board.read_text())
    names = set()
    for expr in exprs:
        names |= {n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if n.startswith("shardwise")}
    return names - recorded


def _ready(prom: Prometheus) -> bool:
    if prom.process.poll() is not None:
        pytest.fail(f"prometheus exited:\n{prom.log.read_text()[-3000:]}")
    try:
        with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_prometheus_sees_the_slowed_rank_and_the_job_gets_the_condition(
    cluster: Any, start_node_runner: Any, shardwise_operator: Any, prometheus: Prometheus
) -> None:
    # The slow switch is test tooling: the runner puts it in the pods' environment (the CRD
    # rejects SHARDWISE_* names in a user's template).
    runner = start_node_runner(extra_args=[f"--env=SHARDWISE_TEST_SLOW_RANK={SLOW_RANK}:{SLOW_FACTOR}"])
    kubectl = Kubectl(cluster)
    namespace = f"obs-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)
    job = tiny_job(
        "slow",
        namespace,
        runner.node_selector,
        "--steps", "400", "--checkpoint-every", "0",
        monitoring={"scrapeIntervalSeconds": 1, "stragglerThreshold": 0.3},
    )  # fmt: skip
    kubectl.apply(job)
    selector = f'namespace="{namespace}",job="slow"'

    score = wait_for(
        "the slowed rank's straggler score above the threshold in Prometheus",
        lambda: [
            s
            for s in prometheus.query(f"shardwise_rank_straggler_score{{{selector}}} > 1.3")
            if s["metric"]["rank"] == str(SLOW_RANK)
        ],
        timeout=180,
        interval=1,
    )
    # c10d rendezvous hands out node ranks by arrival, so the slowed rank may be in either pod:
    # the series names the pod and node that really host it.
    slow_pod, slow_node = score[0]["metric"]["pod"], score[0]["metric"]["node"]
    assert slow_pod in ("slow-node-0", "slow-node-1")
    assert slow_node in runner.nodes

    flagged = wait_for(
        "StragglerDetected=True",
        lambda: (
            (c := condition(kubectl.job(namespace, "slow"), "StragglerDetected"))
            and c["status"] == "True"
            and c
        ),
        timeout=120,
        interval=1,
    )
    assert f"rank {SLOW_RANK}" in flagged["message"]
    assert slow_pod in flagged["message"]
    assert any(e["reason"] == flagged["reason"] for e in kubectl.events(namespace, "slow"))

    # Memory series for every GPU (rank) of the job, with the plan's prediction beside them.
    used = prometheus.query(f"shardwise_gpu_memory_used_bytes{{{selector}}}")
    predicted = prometheus.query(f"shardwise_gpu_model_state_predicted_bytes{{{selector}}}")
    assert sorted(s["metric"]["rank"] for s in used) == ["0", "1", "2", "3"]
    assert sorted(s["metric"]["rank"] for s in predicted) == ["0", "1", "2", "3"]

    # The live /metrics body passes Prometheus' own linter.
    promtool = shutil.which("promtool")
    assert promtool is not None
    lint = subprocess.run([promtool, "check", "metrics"], input=shardwise_operator.metrics(), text=True,
                          capture_output=True, check=False)  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr

    # Every metric the shipped dashboards and alert rules query exists in this real scrape.
    missing = dashboard_and_rule_metrics() - exposed_names(shardwise_operator.metrics())
    assert not missing, f"dashboards / rules query metrics the operator does not export: {sorted(missing)}"

    kubectl("delete", "ptj", "slow", "-n", namespace, "--wait=true", "--timeout=60s")

    def gone() -> bool:
        text = shardwise_operator.metrics()
        return (
            f'job="slow",namespace="{namespace}"' not in text
            and f'namespace="{namespace}",job="slow"' not in text
        )

    wait_for("the job's series removed from /metrics", gone, timeout=60)
    time.sleep(2)  # one more Prometheus scrape: the series must be absent there too
    assert prometheus.query(f"shardwise_gpu_memory_used_bytes{{{selector}}}") == []


def test_progress_advances_in_status_kubectl_and_prometheus(
    cluster: Any, node_runner: Any, shardwise_operator: Any, prometheus: Prometheus
) -> None:
    """While the tiny job trains, status.progress.step advances and the ETA shrinks (written at
    most every 2 s, the e2e operator's --progress-interval); at the end it says 100 %."""
    kubectl = Kubectl(cluster)
    namespace = f"prog-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)
    kubectl.apply(
        tiny_job(
            "prog",
            namespace,
            node_runner.node_selector,
            "--steps",
            "300",
            "--checkpoint-every",
            "0",
            monitoring={"scrapeIntervalSeconds": 1},
        )
    )
    seen: list[dict[str, Any]] = []

    def progress_written() -> bool:
        job = kubectl.job(namespace, "prog")
        progress = job["status"].get("progress")
        if job["status"].get("phase") == "Running" and progress and progress not in seen:
            seen.append(progress)
        return len({p["step"] for p in seen}) >= 3 or job["status"].get("phase") in ("Succeeded", "Failed")

    wait_for("three progress writes while the job runs", progress_written, timeout=240, interval=0.3)
    assert len({p["step"] for p in seen}) >= 3, f"the job ended before three progress writes: {seen}"
    first, last = seen[0], seen[-1]
    assert last["step"] > first["step"] and last["totalSteps"] == first["totalSteps"] == 300
    # The ETA shrinks, unless the measured step time grew meanwhile (2 shared cores under load).
    assert (
        last["remainingSeconds"] <= first["remainingSeconds"]
        or last["measuredStepSeconds"] > first["measuredStepSeconds"]
    ), (first, last)
    assert last["eta"] and last["lastUpdateTime"] and 0 <= last["percent"] < 100
    assert last["summary"] == f"{last['percent']}% ({last['step']}/300)"
    # The planner's estimate beside the measurement (a tiny CPU model: they differ a lot).
    assert last["predictedStepSeconds"] > 0 and last["measuredStepSeconds"] > 0
    assert last["tokensPerSecond"] > 0 and last["loss"] > 0 and last["mfu"] > 0
    # Bounded writes: scrapes come every second, progress writes at most every 2 s, so the steps
    # two successive writes report are at least a second apart on the trainer's clock.
    stamps = [datetime.fromisoformat(p["lastUpdateTime"].replace("Z", "+00:00")).timestamp() for p in seen]
    assert all(b - a >= 1 for a, b in itertools.pairwise(stamps)), stamps

    row = kubectl("get", "ptj", "prog", "-n", namespace).splitlines()
    assert row[0].split()[7:10] == ["PROGRESS", "ETA", "AGE"]

    selector = f'namespace="{namespace}",job="prog"'
    wait_for(
        "progress ratio and both step times in Prometheus",
        lambda: (
            prometheus.query(f"shardwise_job_progress_ratio{{{selector}}} > 0")
            and len(prometheus.query(f"shardwise_job_step_seconds{{{selector}}}")) == 2
        ),
        timeout=60,
        interval=1,
    )

    done = wait_for(
        "Succeeded",
        lambda: (j := kubectl.job(namespace, "prog"))["status"].get("phase") == "Succeeded" and j,
        timeout=300,
        interval=1,
    )
    final = done["status"]["progress"]
    assert (final["step"], final["percent"], final["remainingSeconds"]) == (300, 100, 0)
    line = kubectl("get", "ptj", "prog", "-n", namespace).splitlines()[1]
    assert "100% (300/300)" in line and " 0s " in line
    kubectl("delete", "namespace", namespace, "--wait=false")
