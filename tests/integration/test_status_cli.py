"""`shardwise status` against a live job on the real API server, with the operator's metrics endpoint.

The job is created through the API server and its status written through the status
subresource exactly as the operator writes it (layout, status.progress made by the operator's
own progress functions from trainer samples, latestCheckpoint); the metrics endpoint serves the
operator's exporter rendering of a synthetic two-rank analysis. The test asserts the screen's
shape, parses `-o json`, and checks the exit code 2 with one line for a job that does not exist.
"""

from __future__ import annotations

import io
import json
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from jobs import Kubectl, job_manifest
from shardwise.cli import main
from shardwise.metrics.analysis import JobWindows, analyse, ingest
from shardwise.metrics.exporter import JobMetricsExporter
from shardwise.metrics.plan_view import PlanView, StagePrediction
from shardwise.metrics.progress import Observation, Tracker, advance, progress_status
from shardwise.metrics.settings import AnalysisSettings
from shardwise.metrics.synthetic import SyntheticJob

pytestmark = pytest.mark.integration

PLAN = PlanView(
    tp=1,
    pp=1,
    dp=2,
    step_seconds=0.05,
    model_flops_per_step=2e9,
    gpu="H100-80GB-SXM",
    gpu_peak_flops=989e12,
    mfu=0.4,
    per_stage=(StagePrediction(stage=0, total_bytes=2 * 2**30),),
)


def _progress() -> dict[str, Any]:
    tracker = Tracker()
    for step, when, loss in ((2, 1_790_000_000.0, 6.0), (6, 1_790_000_004.0, 5.0)):
        obs = Observation(
            step=step, timestamp=when, total_steps=20, step_seconds=0.9, compute_seconds=0.6,
            tokens_per_step=2048.0, samples_per_step=16.0, loss=loss,
        )  # fmt: skip
        tracker = advance(tracker, obs)
    progress = progress_status(tracker, PLAN, 2)
    assert progress is not None
    return progress


@pytest.fixture
def metrics_url(namespace: str) -> Iterator[str]:
    exporter = JobMetricsExporter()
    settings = AnalysisSettings()
    job = SyntheticJob(namespace, "watched", PLAN, gpus_per_node=2, slow={1: 1.5})
    state, rng = JobWindows(), random.Random(0)
    for step in range(6):
        state = ingest(state, job.samples(step, rng), settings)
        state, analysis = analyse(state, PLAN, settings)
    exporter.update_job(namespace, "watched", analysis)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = exporter.render()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def _live_job(kubectl: Kubectl, namespace: str) -> dict[str, Any]:
    kubectl.apply(job_manifest("watched", namespace))
    status = {
        "phase": "Running",
        "attempt": 0,
        "restarts": 0,
        "layout": {
            "tensor": 1,
            "pipeline": 1,
            "data": 2,
            "zeroStage": 1,
            "microBatchSize": 4,
            "gradientAccumulation": 2,
            "activationCheckpointing": "none",
            "sequenceParallel": False,
            "offload": "none",
            "nodes": 1,
            "gpusPerNode": 2,
            "gpus": 2,
            "predictedGpuMemoryBytes": 2 * 2**30,
            "gpuMemoryBytes": 80 * 2**30,
            "summary": "TP1×PP1×DP2 Z1",
        },
        "conditions": [
            {"type": "Planned", "status": "True", "reason": "LayoutPlanned", "message": "fits"},
            {
                "type": "Running",
                "status": "True",
                "reason": "AllPodsRunning",
                "message": "1 of 1 pods running",
            },
        ],
        "progress": _progress(),
        "latestCheckpoint": {
            "step": 5,
            "time": "2026-09-21T13:33:24Z",
            "path": "step5",
            "layout": "tp1-pp1-dp2-zero1",
            "attempt": 0,
        },
    }
    kubectl(
        "patch", "ptj", "watched", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip
    return kubectl.job(namespace, "watched")


def _status(kubectl: Kubectl, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["status", "--kubeconfig", str(kubectl.cluster.kubeconfig), *args], out=out)
    return code, out.getvalue()


def test_status_screen_and_json_of_a_live_job(kubectl: Kubectl, namespace: str, metrics_url: str) -> None:
    job = _live_job(kubectl, namespace)
    assert job["status"]["progress"]["summary"] == "30% (6/20)"  # accepted by the CRD schema as is

    code, screen = _status(kubectl, "watched", "-n", namespace, "--metrics-url", metrics_url)
    assert code == 0, screen
    lines = screen.splitlines()
    labels = [line.split()[0] for line in lines if line.strip()][:9]
    assert labels == ["Job", "Layout", "Progress", "ETA", "Loss", "Throughput", "Step", "MFU", "Checkpoint"]
    assert f"{namespace}/watched  [Running]" in screen
    assert "TP1×PP1×DP2 Z1, 1×2 GPUs" in screen
    assert "30% (6/20)" in screen and "━" in screen  # the bar
    assert "14s (at 2026-09-21T14:13:38Z)" in screen  # 14 steps left at 1 s per step
    assert "0.9 s measured, 0.05 s predicted, 0.6 s compute" in screen
    assert "step 5 at 2026-09-21T13:33:24Z (step5, tp1-pp1-dp2-zero1, attempt 0)" in screen
    assert "Ranks" in screen
    table = [line for line in lines if line.startswith("│")]
    assert len(table) == 2  # one row per rank of the job
    assert table[1].split("│")[1].strip() == "1" and "SLOW" not in table[0]

    code, text = _status(kubectl, "watched", "-n", namespace, "-o", "json", "--metrics-url", metrics_url)
    assert code == 0
    view = json.loads(text)
    assert view["phase"] == "Running" and view["layout"]["summary"] == "TP1×PP1×DP2 Z1"
    assert view["progress"]["step"] == 6 and view["progress"]["totalSteps"] == 20
    assert view["progress"]["remainingSeconds"] == 14 and view["progress"]["tokensPerSecond"] == 2048.0
    assert view["latestCheckpoint"]["step"] == 5
    assert [r["rank"] for r in view["ranks"]] == [0, 1]
    assert {"stepSeconds", "computeSeconds", "memoryBytes", "predictedMemoryBytes", "stragglerScore"} <= set(
        view["ranks"][1]
    )
    assert view["ranks"][1]["stragglerScore"] > view["ranks"][0]["stragglerScore"]

    # Without a reachable metrics endpoint the status alone is shown, and -o json says so.
    code, text = _status(
        kubectl, "watched", "-n", namespace, "-o", "json", "--metrics-url", "http://127.0.0.1:9/"
    )
    assert code == 0 and json.loads(text)["ranks"] is None


def test_status_of_a_missing_job_exits_2(
    kubectl: Kubectl, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _status(kubectl, "absent", "-n", namespace)
    assert code == 2 and out == ""
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"shardwise: error: ParallelTrainingJob {namespace}/absent: not found"]
