"""Helpers for the e2e tests that really train: the tiny CPU job, pod logs, trainer JSON lines."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-cpu.yaml"


def tiny_job(
    name: str, namespace: str, node_selector: dict[str, str], *args: str, **spec: Any
) -> dict[str, Any]:
    """examples/tiny-cpu.yaml placed on one node runner's nodes, with trainer args and spec overrides."""
    job = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    job["metadata"] = {"name": name, "namespace": namespace}
    job["spec"]["resources"]["nodeSelector"] = dict(node_selector)
    job["spec"]["template"]["spec"]["containers"][0]["args"] = list(args)
    job["spec"].update(spec)
    return dict(job)


def json_lines(log: str) -> list[dict[str, Any]]:
    """The trainer's JSON lines in a pod log (torchrun may prefix lines)."""
    found = []
    for raw in log.splitlines():
        start = raw.find("{")
        if start < 0:
            continue
        try:
            value = json.loads(raw[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found
