"""Per-GPU peak memory against the plan, its imbalance per stage and job, the MemoryImbalanced condition."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shardwise.metrics.condition_values import (
    MEMORY_IMBALANCED,
    REASON_INSUFFICIENT_DATA,
    REASON_MEMORY_BALANCED,
    REASON_MEMORY_IMBALANCED,
    ConditionValue,
    gib,
    named,
    pct,
)
from shardwise.metrics.plan_view import PlanView
from shardwise.metrics.ranks import RankIdentity, finite
from shardwise.metrics.windows import RankWindow


@dataclass(frozen=True, slots=True)
class GpuMemory:
    """One GPU's memory against the plan."""

    identity: RankIdentity
    used_bytes: float
    predicted_bytes: float | None
    capacity_bytes: float | None
    model_state_bytes: float | None = None
    predicted_model_state_bytes: float | None = None

    @property
    def prediction_error_ratio(self) -> float | None:
        """(used - predicted) / predicted: positive when the GPU holds more than planned."""
        if not self.predicted_bytes:
            return None
        return (self.used_bytes - self.predicted_bytes) / self.predicted_bytes

    @property
    def model_state_error_ratio(self) -> float | None:
        if self.model_state_bytes is None or not self.predicted_model_state_bytes:
            return None
        return (self.model_state_bytes - self.predicted_model_state_bytes) / self.predicted_model_state_bytes

    @property
    def headroom_bytes(self) -> float | None:
        return None if self.capacity_bytes is None else self.capacity_bytes - self.used_bytes

    @property
    def headroom_ratio(self) -> float | None:
        if not self.capacity_bytes:
            return None
        return (self.capacity_bytes - self.used_bytes) / self.capacity_bytes


@dataclass(frozen=True, slots=True)
class Imbalance:
    """Spread of peak memory over a group of GPUs (a pipeline stage, or the whole job)."""

    stage: int | None  # None: the whole job
    gpus: int
    min_bytes: float
    max_bytes: float
    mean_bytes: float
    ratio: float  # max / mean
    spread: float  # (max - min) / max, the CRD's memoryImbalanceThreshold measure
    cv: float  # population standard deviation / mean
    heaviest: RankIdentity
    lightest: RankIdentity


@dataclass(frozen=True, slots=True)
class MemoryBalance:
    """The memory half of a job's analysis."""

    gpus: tuple[GpuMemory, ...]
    stages: tuple[Imbalance, ...]
    job: Imbalance | None
    threshold: float
    findings: tuple[Imbalance, ...]  # the stages whose spread exceeds the threshold


def _imbalance(stage: int | None, gpus: Sequence[GpuMemory]) -> Imbalance:
    used = [g.used_bytes for g in gpus]
    n = len(used)
    mean = math.fsum(used) / n
    lo, hi = min(used), max(used)
    variance = math.fsum((u - mean) ** 2 for u in used) / n
    heaviest = max(gpus, key=lambda g: (g.used_bytes, -g.identity.rank))
    lightest = min(gpus, key=lambda g: (g.used_bytes, g.identity.rank))
    return Imbalance(
        stage=stage,
        gpus=n,
        min_bytes=lo,
        max_bytes=hi,
        mean_bytes=mean,
        ratio=hi / mean if mean > 0 else 1.0,
        spread=(hi - lo) / hi if hi > 0 else 0.0,
        cv=math.sqrt(variance) / mean if mean > 0 else 0.0,
        heaviest=heaviest.identity,
        lightest=lightest.identity,
    )


def memory_balance(
    identities: Mapping[int, RankIdentity],
    windows: Mapping[int, RankWindow],
    plan: PlanView | None,
    threshold: float,
) -> MemoryBalance:
    """Per-GPU peak memory vs the plan, and the imbalance per stage and across the job."""
    gpus: list[GpuMemory] = []
    for rank in sorted(identities):
        samples = windows[rank].samples
        used = finite(s.used_bytes for s in samples)
        if not used:
            continue
        ident = identities[rank]
        prediction = plan.prediction(ident.stage) if plan is not None else None
        capacity = finite(s.capacity_bytes for s in samples)
        if not capacity and plan is not None and plan.capacity_bytes:
            capacity = [float(plan.capacity_bytes)]
        predicted = float(prediction.total_bytes) if prediction and prediction.total_bytes else None
        states = finite(s.model_state_bytes for s in samples)
        predicted_states = finite(s.predicted_model_state_bytes for s in samples)
        gpus.append(
            GpuMemory(
                identity=ident,
                used_bytes=max(used),
                predicted_bytes=predicted,
                capacity_bytes=capacity[-1] if capacity else None,
                model_state_bytes=max(states) if states else None,
                predicted_model_state_bytes=(
                    float(prediction.model_state_bytes)
                    if prediction and prediction.model_state_bytes
                    else (predicted_states[-1] if predicted_states else None)
                ),
            )
        )
    by_stage: dict[int, list[GpuMemory]] = {}
    for g in gpus:
        by_stage.setdefault(g.identity.stage, []).append(g)
    stages = tuple(_imbalance(stage, members) for stage, members in sorted(by_stage.items()))
    return MemoryBalance(
        gpus=tuple(gpus),
        stages=stages,
        job=_imbalance(None, gpus) if gpus else None,
        threshold=threshold,
        findings=tuple(s for s in stages if s.gpus >= 2 and s.spread > threshold),
    )


def memory_condition(balance: MemoryBalance) -> ConditionValue:
    """``MemoryImbalanced``: True naming, per imbalanced stage, the heaviest and lightest GPU."""
    if balance.findings:
        described = [
            f"stage {s.stage}: spread {pct(s.spread)} (max/mean {s.ratio:.2f}), "
            f"{s.heaviest.describe()} peaks at {gib(s.max_bytes)}, "
            f"{s.lightest.describe()} at {gib(s.min_bytes)}"
            for s in sorted(balance.findings, key=lambda s: -s.spread)
        ]
        return ConditionValue(
            MEMORY_IMBALANCED,
            True,
            REASON_MEMORY_IMBALANCED,
            f"Peak GPU memory differs by more than {pct(balance.threshold)} within "
            f"{len(balance.findings)} pipeline stage(s): {named(described)}.",
        )
    compared = [s for s in balance.stages if s.gpus >= 2]
    if not compared:
        return ConditionValue(
            MEMORY_IMBALANCED,
            False,
            REASON_INSUFFICIENT_DATA,
            "Cannot judge: no pipeline stage has two GPUs reporting memory yet.",
        )
    worst = max(compared, key=lambda s: s.spread)
    return ConditionValue(
        MEMORY_IMBALANCED,
        False,
        REASON_MEMORY_BALANCED,
        f"Peak GPU memory within {pct(balance.threshold)} in every pipeline stage "
        f"({balance.job.gpus if balance.job else 0} GPUs; largest spread {pct(worst.spread)} "
        f"in stage {worst.stage}).",
    )
