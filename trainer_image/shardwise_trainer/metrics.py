"""Per-rank stats served by each pod in Prometheus text format (docs/trainer-metrics.md).

Exchange between the local ranks of a pod: every rank atomically rewrites a tiny JSON file
``<stats dir>/rank-<rank>.json`` after each step (write to a temp file, ``os.replace``); local
rank 0 runs an HTTP server on ``SHARDWISE_METRICS_PORT`` whose ``GET /metrics`` renders all the
files of the directory. Files survive a crashed rank (its last figures stay visible with their
timestamp), need no socket protocol and no ordering between ranks.

The text is written by hand (no prometheus_client dependency in the image); the tests parse it
with ``prometheus_client.parser``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("shardwise_trainer.metrics")

PREFIX = "shardwise_trainer_"
#: (name, type, help) of every metric, in output order; ``memory_bytes`` has a ``kind`` label.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("step", "gauge", "Last completed optimizer step of this rank."),
    (
        "step_seconds",
        "gauge",
        "Wall time of this rank's last optimizer step (excluding the end-of-step wait).",
    ),
    ("wait_seconds", "gauge", "Time this rank waited for the slowest rank at the end of its last step."),
    (
        "compute_seconds",
        "gauge",
        "Time of this rank's last step spent outside communication calls (step_seconds minus "
        "communication_seconds; CUDA-event time of forward, backward and optimizer on GPU).",
    ),
    (
        "communication_seconds",
        "gauge",
        "Time of this rank's last step spent inside torch.distributed / DeepSpeed communication calls.",
    ),
    (
        "tokens_per_second",
        "gauge",
        "Tokens this rank's data-parallel replica processed per second, last step.",
    ),
    (
        "total_steps",
        "gauge",
        "Optimizer steps the run is to complete (--steps): the denominator of progress.",
    ),
    (
        "tokens_per_step",
        "gauge",
        "Tokens of one optimizer step over all replicas (global batch x sequence length).",
    ),
    ("samples_per_step", "gauge", "Samples of one optimizer step over all replicas (the global batch size)."),
    ("loss", "gauge", "Training loss of the last step (mean over the global batch)."),
    ("validation_loss", "gauge", "Loss on the validation split at the last evaluation (--eval-every)."),
    ("memory_bytes", "gauge", "Memory of this rank by kind (model states, device and process memory)."),
    ("model_state_bytes", "gauge", "Parameters + gradients + optimizer states this rank holds (peak)."),
    ("predicted_model_state_bytes", "gauge", "The plan's model-state bytes for this rank's stage."),
    ("last_update_timestamp_seconds", "gauge", "Unix time this rank last updated its stats."),
    ("checkpoint_step", "gauge", "Step of the newest complete checkpoint this run saved."),
    ("checkpoint_timestamp_seconds", "gauge", "Unix time the newest complete checkpoint was completed."),
)
LABELS = ("namespace", "job", "pod", "node", "rank", "local_rank", "gpu", "stage")


def default_stats_dir(pod: str, node_rank: int, run_id: str) -> Path:
    """A per-pod directory shared by its local ranks (under the system temp dir, i.e. /tmp)."""
    safe = "".join(
        ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{pod or 'local'}-{node_rank}-{run_id}"
    )
    return Path(tempfile.gettempdir()) / f"shardwise-stats-{safe}"


def write_rank_stats(stats_dir: Path, rank: int, stats: Mapping[str, Any]) -> None:
    """Atomically replace this rank's stats file."""
    stats_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=stats_dir, prefix=f".rank-{rank}-", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(stats, fh)
    os.replace(tmp, stats_dir / f"rank-{rank}.json")


def update_rank_stats(stats_dir: Path, rank: int, **changes: Any) -> None:
    """Rewrite this rank's stats file with ``changes`` merged in (a checkpoint just completed)."""
    path = stats_dir / f"rank-{rank}.json"
    try:
        current = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        current = {}
    write_rank_stats(stats_dir, rank, {**current, **changes})


def read_all_stats(stats_dir: Path) -> list[dict[str, Any]]:
    """Every rank file of the directory, ordered by rank (unreadable files are skipped)."""
    out = []
    for path in sorted(stats_dir.glob("rank-*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):  # replaced between glob and read: next scrape
            continue
    return sorted(out, key=lambda s: int(s.get("labels", {}).get("rank", 0)))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, Any], extra: Mapping[str, str] | None = None) -> str:
    items = [(k, str(labels.get(k, ""))) for k in LABELS]
    items += list((extra or {}).items())
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def render(all_stats: list[dict[str, Any]]) -> str:
    """Prometheus text exposition (format 0.0.4) of the given rank stats."""
    lines: list[str] = []
    for name, kind, help_text in METRICS:
        full = PREFIX + name
        samples = []
        for st in all_stats:
            labels = st.get("labels", {})
            if name == "memory_bytes":
                for mem_kind, value in sorted((st.get("memory_bytes") or {}).items()):
                    samples.append(f"{full}{_labels(labels, {'kind': mem_kind})} {float(value)!r}")
            elif st.get(name) is not None:
                samples.append(f"{full}{_labels(labels)} {float(st[name])!r}")
        if samples:
            lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", *samples]
    return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    stats_dir: Path

    def do_GET(self) -> None:
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = render(read_all_stats(self.stats_dir)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


class MetricsServer:
    """The pod's stats endpoint (local rank 0 only), serving in a daemon thread."""

    def __init__(self, host: str, port: int, stats_dir: Path) -> None:
        handler = type("Handler", (_Handler,), {"stats_dir": stats_dir})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="shardwise-metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
