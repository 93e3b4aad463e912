"""Test / benchmark tooling: run `shardwise operator` as a real subprocess against a kubeconfig."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within the timeout."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class OperatorProcess:
    """A running operator: its process, metrics URL and log file."""

    process: subprocess.Popen[bytes]
    metrics_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return str(response.read().decode())


@contextlib.contextmanager
def running_operator(
    kubeconfig: str | Path, log_path: Path, *extra_args: str, env: dict[str, str] | None = None
) -> Iterator[OperatorProcess]:
    """Start the operator, wait until its metrics endpoint answers, stop it (SIGTERM) at the end."""
    port = free_port()
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shardwise.cli",
            "operator",
            "--kubeconfig",
            str(kubeconfig),
            "--metrics-port",
            str(port),
            "--metrics-address",
            "127.0.0.1",
            *extra_args,
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    op = OperatorProcess(process, f"http://127.0.0.1:{port}/metrics", log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"operator exited with {process.returncode}:\n{op.log()[-4000:]}")
            try:
                op.metrics()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"operator metrics never answered:\n{op.log()[-4000:]}") from None
                time.sleep(0.2)
        yield op
    finally:
        stop_process(process, timeout=20)
        log_file.close()
