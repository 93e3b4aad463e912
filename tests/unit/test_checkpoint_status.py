"""status.latestCheckpoint: from the trainer's scraped checkpoint gauges, forward only."""

from __future__ import annotations

from typing import Any

import pytest

from shardwise.jobstatus import checkpoint_shards, layout_name, with_checkpoint
from shardwise.metrics.trainer_page import latest_checkpoint, parse_trainer_metrics

LAYOUT = {"tensor": 1, "pipeline": 1, "data": 2, "zeroStage": 2}


def _page(*ranks: tuple[int, float | None]) -> str:
    lines = ["# TYPE shardwise_trainer_checkpoint_step gauge"]
    lines += [f'shardwise_trainer_checkpoint_step{{rank="{r}"}} {s}' for r, s in ranks if s is not None]
    lines += ["# TYPE shardwise_trainer_checkpoint_timestamp_seconds gauge"]
    lines += [
        f'shardwise_trainer_checkpoint_timestamp_seconds{{rank="{r}"}} {1_800_000_000 + (s or 0)}'
        for r, s in ranks
        if s is not None
    ]
    lines += ["# TYPE shardwise_trainer_step gauge"] + [
        f'shardwise_trainer_step{{rank="{r}"}} 9' for r, _ in ranks
    ]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("ranks", "expected"),
    [
        (((0, None), (1, None)), None),  # no checkpoint yet
        (((0, 8), (1, 8)), (8, 1_800_000_008.0)),
        (((0, 8), (1, 4)), (8, 1_800_000_008.0)),  # a rank's page lags: the newest counts
        (((0, None), (1, 4)), (4, 1_800_000_004.0)),
    ],
)
def test_latest_checkpoint_from_page(ranks: tuple[tuple[int, float | None], ...], expected: Any) -> None:
    assert latest_checkpoint(parse_trainer_metrics(_page(*ranks))) == expected


@pytest.mark.parametrize(
    ("current", "found", "expected_step"),
    [
        (None, None, None),  # nothing reported: no field
        (None, (4, 1_800_000_000.0), 4),
        ({"step": 4}, (8, 1_800_000_000.0), 8),
        ({"step": 8}, (4, 1_800_000_000.0), 8),  # never backwards (a lagging page)
        ({"step": 8}, (8, 1_800_000_000.0), 8),
    ],
)
def test_with_checkpoint_moves_forward_only(current: Any, found: Any, expected_step: Any) -> None:
    status: dict[str, Any] = {"layout": LAYOUT}
    if current is not None:
        status["latestCheckpoint"] = current
    out = with_checkpoint(status, found, attempt=1)
    assert (out.get("latestCheckpoint") or {}).get("step") == expected_step
    if found is not None and (current is None or found[0] > current["step"]):
        assert out["latestCheckpoint"] == {
            "step": found[0],
            "time": "2027-01-15T08:00:00Z",
            "path": f"step{found[0]}",
            "layout": "tp1-pp1-dp2-zero2",
            "attempt": 1,
        }
        assert status.get("latestCheckpoint") == current  # pure: the input is not changed


def test_layout_name_defaults() -> None:
    assert layout_name({}) == "tp1-pp1-dp1-zero0"
    assert layout_name(LAYOUT) == "tp1-pp1-dp2-zero2"


@pytest.mark.parametrize(
    ("status", "shards"),
    [
        ({}, None),
        ({"latestCheckpoint": {"layout": "tp2-pp1-dp4-zero1"}}, (2, 1)),
        ({"latestCheckpoint": {"layout": "tp1-pp4-dp1-zero0"}}, (1, 4)),
        ({"latestCheckpoint": {"layout": "garbage"}}, None),
        ({"latestCheckpoint": {"layout": "tpx-pp1"}}, None),
    ],
)
def test_checkpoint_shards_read_the_latest_checkpoint_layout(
    status: dict[str, Any], shards: tuple[int, int] | None
) -> None:
    assert checkpoint_shards(status) == shards
