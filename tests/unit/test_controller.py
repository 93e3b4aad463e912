"""Unit tests of the controller's per-job bookkeeping: what a deleted job or node leaves behind."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shardwise.handlers import app
from shardwise.handlers.app import Controller, failure_backoff
from shardwise.kube.events import event_name

KEY = ("ns", "job")


def job(uid: str) -> dict[str, Any]:
    return {"metadata": {"namespace": KEY[0], "name": KEY[1], "uid": uid}, "status": {}}


def controller_with(*jobs: dict[str, Any]) -> Controller:
    c = Controller()
    c.indexes["shardwise_jobs"] = {KEY: list(jobs)} if jobs else {}
    return c


def series_of(c: Controller) -> list[str]:
    text = c.exporter.render().decode()
    return [line for line in text.splitlines() if f'job="{KEY[1]}"' in line]


def test_a_pass_that_ends_after_the_job_is_gone_leaves_no_series() -> None:
    c = controller_with(job("u1"))
    c._observed(KEY, "u1", {"phase": "Running", "restarts": 0})
    assert c.metrics.jobs and series_of(c)
    c.indexes["shardwise_jobs"] = {}  # the watch's DELETED event: kopf drops it from the index
    c.forget(KEY)
    c._observed(KEY, "u1", {"phase": "Succeeded", "restarts": 0})  # the pass that deleted it
    assert not c.metrics.jobs and not series_of(c)


def test_observations_of_an_older_namesake_are_dropped() -> None:
    c = controller_with(job("new"))
    c._observed(KEY, "old", {"phase": "Succeeded"})
    assert not c.metrics.jobs


def test_forget_drops_the_failure_counter_of_the_job() -> None:
    c = controller_with(job("u1"))

    async def fail() -> None:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            c._failed(KEY)

    asyncio.run(fail())
    assert KEY in c.failures
    c.forget(KEY)
    assert KEY not in c.failures


def test_a_clean_pass_right_after_a_failure_keeps_the_backoff() -> None:
    c = controller_with(job("u1"))
    c.failures[KEY] = (4, app.time.monotonic())
    c._succeeded(KEY)
    assert c.failures[KEY][0] == 4  # alternating passes keep backing off
    c.failures[KEY] = (4, app.time.monotonic() - failure_backoff(4, 1.0) - 1)
    c._succeeded(KEY)
    assert KEY not in c.failures  # healthy for a whole backoff period: forgotten


@pytest.mark.parametrize(("count", "low", "high"), [(1, 0.5, 1.5), (3, 2.0, 6.0), (30, 150.0, 300.0)])
def test_failure_backoff_is_jittered_and_capped(count: int, low: float, high: float) -> None:
    assert failure_backoff(count, 0.0) == pytest.approx(low)
    assert failure_backoff(count, 0.99999) <= high


def test_node_signatures_of_deleted_nodes_are_pruned(monkeypatch: pytest.MonkeyPatch) -> None:
    c = controller_with()
    monkeypatch.setattr(app, "CONTROLLER", c)
    body = {"metadata": {"name": "n1", "labels": {}}, "status": {}, "spec": {}}
    handler = app._node_event.__wrapped__ if hasattr(app._node_event, "__wrapped__") else app._node_event
    asyncio.run(handler(event={"type": "ADDED"}, name="n1", body=body))
    assert "n1" in c.node_signatures
    asyncio.run(handler(event={"type": "DELETED"}, name="n1", body=body))
    assert "n1" not in c.node_signatures


@pytest.mark.parametrize(
    ("job_name", "nanos", "sequence", "expected"),
    [("a", 255, 0, "a.ff000"), ("train", 1, 4097, "train.1001"), ("x", 0, 4095, "x.0fff")],
)
def test_event_names_are_fixed_before_the_post(
    job_name: str, nanos: int, sequence: int, expected: str
) -> None:
    assert event_name(job_name, nanos, sequence) == expected
