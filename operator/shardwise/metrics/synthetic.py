"""Synthetic per-rank samples of a planned job (seeded, pure) for the analysis tests, benchmark and demos."""

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
    noise: float = 0.02  # relative standard deviation of a rank's compute time per step
    # Realistic noise on top: a fixed per-rank bias (GPUs of one model differ by a few percent),
    # rare heavy-tailed spikes (GC pauses, a data-loader hiccup), and the collective's own time.
    rank_bias: float = 0.0  # the per-rank bias is drawn once, uniformly within +- this fraction
    spike_probability: float = 0.0  # per rank and step
    spike_factor: float = 3.0  # a spike multiplies the step's compute by U(1.2, spike_factor)
    communication_fraction: float = 0.0  # collective time / the slowest compute of its group
    # Who waits for whom at the end of a step: "stage" (the ranks of a pipeline stage meet in
    # its data-/tensor-parallel collectives), "job" (pipeline stages too: the step ends when the
    # slowest stage is done), "none" (no collective: step time = the rank's own compute).
    sync: str = "stage"

    def pod_of(self, rank: int) -> str:
        return f"{self.job}-node-{rank // self.gpus_per_node}"

    def node_of(self, rank: int) -> str:
        return f"gpu-node-{rank // self.gpus_per_node}"

    def _bias(self, rank: int) -> float:
        if not self.rank_bias:
            return 1.0
        # Drawn from the rank alone: the same bias on every call, whatever the caller's rng.
        return 1.0 + random.Random(f"{self.job}/{rank}").uniform(-self.rank_bias, self.rank_bias)

    def samples(
        self, step: int, rng: random.Random | None = None, *, outlier: Mapping[int, float] | None = None
    ) -> tuple[RankSample, ...]:
        """Every rank's sample at ``step``; ``outlier`` multiplies single ranks' compute this step only."""
        compute: dict[int, float] = {}
        for rank in range(self.plan.world_size):
            stage = self.plan.stage_of(rank)
            cost = self.stage_cost[stage] if stage < len(self.stage_cost) else 1.0
            seconds = self.base_step_seconds * cost * self.slow.get(rank, 1.0) * self._bias(rank)
            if rng is not None and self.noise:
                seconds *= max(0.5, rng.gauss(1.0, self.noise))
            if rng is not None and self.spike_probability and rng.random() < self.spike_probability:
                seconds *= rng.uniform(1.2, self.spike_factor)
            compute[rank] = seconds * (outlier or {}).get(rank, 1.0)
        group_end: dict[int, float] = {}  # group -> when its slowest rank is done computing
        for rank, seconds in compute.items():
            group = self._group(rank)
            group_end[group] = max(seconds, group_end.get(group, 0.0))
        out = []
        for rank in range(self.plan.world_size):
            stage = self.plan.stage_of(rank)
            end = group_end[self._group(rank)]
            step_seconds = end * (1 + self.communication_fraction) if self.sync != "none" else compute[rank]
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
                    step_seconds=step_seconds,
                    wait_seconds=0.0,
                    compute_seconds=compute[rank],
                    communication_seconds=step_seconds - compute[rank],
                    tokens_per_second=self.tokens_per_step / step_seconds,
                    memory_bytes=tuple(sorted(memory)),
                    model_state_bytes=float(prediction.model_state_bytes or 0),
                    predicted_model_state_bytes=float(prediction.model_state_bytes or 0),
                    timestamp=1_700_000_000.0 + step,
                )
            )
        return tuple(out)

    def _group(self, rank: int) -> int:
        if self.sync == "job":
            return 0
        return self.plan.stage_of(rank) if self.sync == "stage" else rank


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
