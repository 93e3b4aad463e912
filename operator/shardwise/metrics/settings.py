"""Detection knobs of the analysis, from a job's ``spec.monitoring``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class AnalysisSettings:
    """Detection knobs; the first two come from ``spec.monitoring`` (see :meth:`from_monitoring`)."""

    straggler_threshold: float = 0.2
    memory_imbalance_threshold: float = 0.1
    consecutive_windows: int = 3
    window_size: int = 10
    min_samples: int = 3

    def __post_init__(self) -> None:
        if not self.straggler_threshold > 0:
            raise ValueError("straggler_threshold must be > 0")
        if not 0 < self.memory_imbalance_threshold <= 1:
            raise ValueError("memory_imbalance_threshold must be in (0, 1]")
        if self.consecutive_windows < 1 or self.window_size < 1:
            raise ValueError("consecutive_windows and window_size must be >= 1")
        if not 1 <= self.min_samples <= self.window_size:
            raise ValueError("min_samples must be in [1, window_size]")

    @classmethod
    def from_monitoring(cls, monitoring: Mapping[str, Any] | None, **overrides: Any) -> AnalysisSettings:
        """From a job's ``spec.monitoring`` (CRD defaults apply to absent keys)."""
        m = monitoring or {}
        return cls(
            straggler_threshold=float(m.get("stragglerThreshold", 0.2)),
            memory_imbalance_threshold=float(m.get("memoryImbalanceThreshold", 0.1)),
            **overrides,
        )
