"""A synthetic job fed to the pure straggler analysis window by window (shared by the unit tests)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from shardwise.metrics.analysis import (
    AnalysisSettings,
    JobAnalysis,
    JobWindows,
    RankTiming,
    StragglerReport,
    analyse,
    ingest,
)
from shardwise.metrics.synthetic import SyntheticJob

SETTINGS = AnalysisSettings()  # Compute signal, threshold 0.2, stage threshold 0.5, K = 3, window 10


@dataclass
class Run:
    """Feeds a synthetic job window by window and records who is flagged after each pass."""

    job: SyntheticJob
    settings: AnalysisSettings = SETTINGS
    seed: int = 0
    state: JobWindows = field(default_factory=JobWindows)
    step: int = 0
    flagged: list[frozenset[int]] = field(default_factory=list)
    last: JobAnalysis | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def window(
        self,
        samples: int = 1,
        *,
        slow: Mapping[int, float] | None = None,
        outlier: Mapping[int, float] | None = None,
    ) -> frozenset[int]:
        """One analysis pass after ``samples`` new steps per rank (``outlier`` on the first one)."""
        job = self.job if slow is None else replace(self.job, slow=slow)
        for i in range(samples):
            self.step += 1
            batch = job.samples(self.step, self.rng, outlier=outlier if i == 0 else None)
            self.state = ingest(self.state, batch, self.settings)
        self.state, self.last = analyse(self.state, self.job.plan, self.settings)
        flagged = frozenset(r.identity.rank for r in self.last.stragglers.findings)
        self.flagged.append(flagged)
        return flagged

    def tumbling(self, **kwargs: Mapping[int, float]) -> frozenset[int]:
        """A window of entirely fresh samples (``window_size`` new steps per rank)."""
        return self.window(self.settings.window_size, **kwargs)

    @property
    def report(self) -> StragglerReport:
        assert self.last is not None
        return self.last.stragglers

    def timing(self, rank: int) -> RankTiming:
        return next(r for r in self.report.ranks if r.identity.rank == rank)


def ever_flagged(run: Run) -> set[int]:
    return set().union(*run.flagged)


def first_flagged(run: Run, rank: int) -> int | None:
    """1-based index of the first pass that flagged ``rank``."""
    return next((i + 1 for i, f in enumerate(run.flagged) if rank in f), None)
