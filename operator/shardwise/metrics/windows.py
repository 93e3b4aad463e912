"""Per-rank sample windows and straggler hysteresis state carried between analysis passes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from shardwise.metrics.settings import AnalysisSettings
from shardwise.metrics.trainer_page import RankSample


@dataclass(frozen=True, slots=True)
class RankWindow:
    """The last ``window_size`` distinct samples of one rank, oldest first.

    ``new_samples`` counts samples added since the last analysis pass: the straggler counters
    only move on passes that saw new steps, so scraping faster than the trainer steps does not
    count the same step twice.
    """

    samples: tuple[RankSample, ...] = ()
    new_samples: int = 0

    def add(self, sample: RankSample, size: int) -> RankWindow:
        if self.samples:
            last = self.samples[-1]
            same = (last.step, last.timestamp) == (sample.step, sample.timestamp)
            if same and (sample.step is not None or sample.timestamp is not None):
                return self  # the same step scraped again
        return RankWindow((*self.samples, sample)[-size:], self.new_samples + 1)


@dataclass(frozen=True, slots=True)
class StragglerTrack:
    """Hysteresis state of one rank: consecutive slow / clear windows and the current verdict."""

    slow_windows: int = 0
    clear_windows: int = 0
    flagged: bool = False


@dataclass(frozen=True, slots=True)
class JobWindows:
    """Everything the analysis carries from one pass to the next for one job."""

    windows: Mapping[int, RankWindow] = field(default_factory=dict)
    tracks: Mapping[int, StragglerTrack] = field(default_factory=dict)


def ingest(state: JobWindows, samples: Iterable[RankSample], settings: AnalysisSettings) -> JobWindows:
    """The windows with one scrape's samples appended (bounded to ``settings.window_size``)."""
    windows = dict(state.windows)
    for sample in samples:
        windows[sample.rank] = windows.get(sample.rank, RankWindow()).add(sample, settings.window_size)
    return replace(state, windows=windows)


def keep_ranks(state: JobWindows, ranks: Iterable[int]) -> JobWindows:
    """Only these ranks' windows and tracks (after a re-plan changed the world size)."""
    keep = set(ranks)
    return JobWindows(
        {r: w for r, w in state.windows.items() if r in keep},
        {r: t for r, t in state.tracks.items() if r in keep},
    )
