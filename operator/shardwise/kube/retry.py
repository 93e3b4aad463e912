"""The one retry policy of both API clients (the operator's and the node runner's): Retry-After honoured."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

from shardwise.lifecycle import jittered

# 429: the API server's priority and fairness throttles; 503: it is shutting down or not ready
# (both send Retry-After); 500 / 502 / 504: a restart or a proxy in between. A 409 on create
# means "already exists", success for the callers, so it is never retried here.
RETRYABLE_STATUS: Final = frozenset({429, 500, 502, 503, 504})


def retry_after_seconds(headers: Mapping[str, str] | None, now: datetime | None = None) -> float | None:
    """The wait a response's Retry-After header asks for (delta-seconds or an HTTP-date, RFC 9110
    10.2.3), None when absent or unreadable. Header names are matched case-insensitively."""
    if not headers:
        return None
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many attempts, and how long before the next one: the server's Retry-After when it sends
    one (capped, so a confused server cannot stall a client for hours), else jittered exponential
    backoff (so many clients refused at once do not return in lockstep)."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0
    max_retry_after: float = 60.0

    def retryable(self, status: int | None, attempt: int) -> bool:
        """Whether a failed attempt (0-based) is tried again: `status` is the HTTP status, None when
        there was no answer (a timeout, a dropped connection), which is transient too."""
        return (status is None or status in RETRYABLE_STATUS) and attempt + 1 < self.attempts

    def delay(
        self, attempt: int, headers: Mapping[str, str] | None = None, draw: float | None = None
    ) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based)."""
        asked = retry_after_seconds(headers)
        if asked is not None:
            return min(asked, self.max_retry_after)
        backoff = min(self.base_delay * (2**attempt), self.max_delay)
        return jittered(backoff, random.random() if draw is None else draw, cap=self.max_delay * 1.5)
