"""Synthetic per-rank samples of a planned job, for the analysis tests, the benchmark and demos.

Pure and deterministic (the caller passes a seeded ``random.Random``): a rank's step time is
``base * stage_cost[stage] * slow[rank]`` times a multiplicative noise, its memory the plan's
stage prediction plus a per-rank offset.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from shardwise.metrics.analysis import PlanView, RankSample, StagePrediction

GIB = 2**30


@dataclass(frozen=True, slots=True)
class SyntheticJob:
    """A job whose ranks report step times and memory around the given figures."""

    namespace: str
    job: str
    plan: PlanView
    gpus_per_node: int = 8
    base_step_seconds: float = 1.0
    stage_cost: Sequence[float] = ()  # multiplier per pipeline stage (default 1 each)
    slow: Mapping[int, float] = field(default_factory=dict)  # rank -> step time multiplier
    memory_offset_bytes: Mapping[int, float] = field(default_factory=dict)  # rank -> extra bytes
    tokens_per_step: float = 8192.0
    noise: float = 0.02  # relative standard deviation of step times

    def pod_of(self, rank: int) -> str:
        return f"{self.job}-node-{rank // self.gpus_per_node}"

    def node_of(self, rank: int) -> str:
        return f"gpu-node-{rank // self.gpus_per_node}"

    def samples(
        self, step: int, rng: random.Random | None = None, *, outlier: Mapping[int, float] | None = None
    ) -> tuple[RankSample, ...]:
        """Every rank's sample at ``step``; ``outlier`` multiplies single ranks' time this step only."""
        out = []
        for rank in range(self.plan.world_size):
            stage = self.plan.stage_of(rank)
            cost = self.stage_cost[stage] if stage < len(self.stage_cost) else 1.0
            seconds = self.base_step_seconds * cost * self.slow.get(rank, 1.0)
            if rng is not None and self.noise:
                seconds *= max(0.5, rng.gauss(1.0, self.noise))
            seconds *= (outlier or {}).get(rank, 1.0)
            prediction = self.plan.prediction(stage) or StagePrediction(stage, 20 * GIB, 12 * GIB)
            used = prediction.total_bytes + self.memory_offset_bytes.get(rank, 0.0)
            memory = [("peak_allocated", used * 0.95), ("peak_reserved", used)]
            if self.plan.capacity_bytes:
                memory.append(("device_total", float(self.plan.capacity_bytes)))
            out.append(
                RankSample(
                    rank=rank,
                    pod=self.pod_of(rank),
                    node=self.node_of(rank),
                    gpu=str(rank % self.gpus_per_node),
                    local_rank=rank % self.gpus_per_node,
                    stage=stage,
                    namespace=self.namespace,
                    job=self.job,
                    step=step,
                    step_seconds=seconds,
                    wait_seconds=0.0,
                    tokens_per_second=self.tokens_per_step / seconds,
                    memory_bytes=tuple(sorted(memory)),
                    model_state_bytes=float(prediction.model_state_bytes or 0),
                    predicted_model_state_bytes=float(prediction.model_state_bytes or 0),
                    timestamp=1_700_000_000.0 + step,
                )
            )
        return tuple(out)


def uniform_plan(
    tp: int = 1, pp: int = 1, dp: int = 8, *, total_bytes: int = 20 * GIB, capacity_bytes: int = 80 * GIB
) -> PlanView:
    """A plan whose stages all predict ``total_bytes`` per GPU (model states 60 % of it)."""
    return PlanView(
        tp=tp,
        pp=pp,
        dp=dp,
        capacity_bytes=capacity_bytes,
        per_stage=tuple(StagePrediction(s, total_bytes, total_bytes * 6 // 10) for s in range(pp)),
    )
