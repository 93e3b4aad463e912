"""Bounds on what the operator reads from a trainer pod's stats endpoint (import-free: the CLI reads them)."""

from __future__ import annotations

from typing import Final

# The largest stats page read from one pod per scrape (`--stats-max-bytes`): a trainer page holds
# a few kilobytes per local rank, so anything far past that is not the trainer's, or is broken.
DEFAULT_STATS_MAX_BYTES: Final = 1 << 20
