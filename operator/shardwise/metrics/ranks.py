"""Who a rank is (pod, node, GPU, stage) and the robust statistics its figures are judged by."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shardwise.metrics.plan_view import PlanView
from shardwise.metrics.trainer_page import RankSample


@dataclass(frozen=True, slots=True)
class RankIdentity:
    """Where a rank runs: what a finding names."""

    rank: int
    pod: str
    node: str
    gpu: str
    stage: int
    local_rank: int = 0

    def describe(self) -> str:
        return f"rank {self.rank} (pod {self.pod}, node {self.node}, GPU {self.gpu}, stage {self.stage})"


def median(sorted_values: Sequence[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else (sorted_values[mid - 1] + sorted_values[mid]) / 2


def median_without(sorted_values: Sequence[float], index: int) -> float:
    """Median of ``sorted_values`` with the element at ``index`` left out, in O(1)."""
    n = len(sorted_values) - 1

    def at(j: int) -> float:
        return sorted_values[j if j < index else j + 1]

    mid = n // 2
    return at(mid) if n % 2 else (at(mid - 1) + at(mid)) / 2


def finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and -math.inf < v < math.inf]


def identity_of(rank: int, latest: RankSample, plan: PlanView | None) -> RankIdentity:
    if plan is not None and rank < plan.world_size:
        stage = plan.stage_of(rank)
    else:
        stage = latest.stage if latest.stage is not None else 0
    return RankIdentity(rank, latest.pod, latest.node, latest.gpu, stage, latest.local_rank)
