"""Detection knobs of the analysis, from a job's ``spec.monitoring``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

#: ``spec.monitoring.stragglerSignal`` values: the trainer's compute time (outside collectives),
#: or the wall step time (every data-parallel rank waits for the slowest: only useful when the
#: trainer reports no compute time).
SIGNAL_COMPUTE: Final = "Compute"
SIGNAL_STEP: Final = "Step"
SIGNALS: Final = (SIGNAL_COMPUTE, SIGNAL_STEP)


@dataclass(frozen=True, slots=True)
class AnalysisSettings:
    """Detection knobs; all but the window sizes come from ``spec.monitoring`` (:meth:`from_monitoring`)."""

    straggler_threshold: float = 0.2
    memory_imbalance_threshold: float = 0.1
    consecutive_windows: int = 3
    window_size: int = 10
    min_samples: int = 3
    straggler_signal: str = SIGNAL_COMPUTE
    # Stages of one reporting rank are compared with the other stages by their share of the step
    # spent computing; stages differ by design (embedding, loss head), hence a wider threshold.
    stage_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not self.straggler_threshold > 0 or not self.stage_threshold > 0:
            raise ValueError("straggler_threshold and stage_threshold must be > 0")
        if not 0 < self.memory_imbalance_threshold <= 1:
            raise ValueError("memory_imbalance_threshold must be in (0, 1]")
        if self.consecutive_windows < 1 or self.window_size < 1:
            raise ValueError("consecutive_windows and window_size must be >= 1")
        if not 1 <= self.min_samples <= self.window_size:
            raise ValueError("min_samples must be in [1, window_size]")
        if self.straggler_signal not in SIGNALS:
            raise ValueError(f"straggler_signal must be one of {', '.join(SIGNALS)}")

    @classmethod
    def from_monitoring(cls, monitoring: Mapping[str, Any] | None, **overrides: Any) -> AnalysisSettings:
        """From a job's ``spec.monitoring`` (CRD defaults apply to absent keys)."""
        m = monitoring or {}
        values: dict[str, Any] = {
            "straggler_threshold": float(m.get("stragglerThreshold", 0.2)),
            "memory_imbalance_threshold": float(m.get("memoryImbalanceThreshold", 0.1)),
            "consecutive_windows": int(m.get("stragglerWindows", 3)),
            "straggler_signal": str(m.get("stragglerSignal", SIGNAL_COMPUTE)),
            "stage_threshold": float(m.get("stragglerStageThreshold", 0.5)),
        }
        values.update(overrides)
        return cls(**values)
