"""Unit tests of the pure retry arithmetic: exponential backoff, its jitter and its caps."""

from __future__ import annotations

import pytest

from shardwise.lifecycle import backoff_seconds, jittered


@pytest.mark.parametrize(
    ("count", "base", "expected"),
    [(1, 1.0, 1.0), (2, 1.0, 2.0), (5, 1.0, 16.0), (4, 10.0, 80.0), (20, 10.0, 300.0), (0, 10.0, 10.0)],
)
def test_backoff_doubles_per_failure_up_to_the_cap(count: int, base: float, expected: float) -> None:
    assert backoff_seconds(count, base) == expected


@pytest.mark.parametrize(
    ("delay", "draw", "expected"),
    [
        (8.0, 0.0, 4.0),  # the low end: half the delay
        (8.0, 0.5, 8.0),
        (8.0, 0.999, 11.992),  # just under one and a half
        (300.0, 0.9, 300.0),  # never past the cap
        (8.0, -1.0, 4.0),  # a draw outside [0, 1) is clamped
        (8.0, 7.0, 12.0),
    ],
)
def test_jitter_spreads_a_delay_over_half_to_one_and_a_half(
    delay: float, draw: float, expected: float
) -> None:
    assert jittered(delay, draw) == pytest.approx(expected)


def test_jittered_retries_of_one_failure_count_do_not_line_up() -> None:
    delays = {jittered(backoff_seconds(3, 1.0), draw / 10) for draw in range(10)}
    assert len(delays) == 10 and min(delays) >= 2.0 and max(delays) < 6.0
