"""What a training step hides: matmul efficiency by size, DP / ZeRO traffic behind compute.

The rules are those of the frameworks the trainer uses (docs/planner.md, "Step time"):

- achieved fraction of peak for the layer matmuls rises with their size: `mfu · h / (h + h0)`,
  h the hidden size, h0 = `settings.matmul_half_size` (small matmuls leave the tensor cores idle;
  fitted to Megatron-LM's A100 runs, tests/unit/test_planner_calibration.py);
- data-parallel gradient reduction is bucketed and overlaps the backward pass (DeepSpeed
  `overlap_comm`, Megatron's overlapped grad reduce, PyTorch DDP buckets): with ZeRO 0/1 the
  all-reduce runs during the last micro-batch's backward, with ZeRO-2 each micro-batch's
  reduce-scatter during its own backward; only what exceeds that backward, and at least the last
  bucket, is exposed;
- ZeRO-3 prefetches the next modules' weights during compute: per micro-batch, gathers and
  reduce-scatters are exposed only beyond that micro-batch's forward + backward;
- tensor-parallel all-reduces, pipeline transfers and the pipeline bubble sit on the critical path
  (Megatron's TP collectives are between dependent matmuls): fully exposed.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.planner.architecture import Architecture
from shardwise.planner.request import PlannerSettings


def matmul_efficiency(arch: Architecture | None, settings: PlannerSettings) -> float:
    """Fraction of peak FLOP/s the step's matmuls reach (<= settings.mfu, the asymptote)."""
    if arch is None:
        return settings.mfu
    h = float(arch.hidden_size)
    return settings.mfu * h / (h + settings.matmul_half_size)


@dataclass(frozen=True, slots=True)
class DataParallelTraffic:
    """Seconds of DP / ZeRO communication per step, split by what can hide it."""

    once: float  # at the accumulation boundary, overlapping the last micro-batch's backward
    after: float  # after the optimizer step (ZeRO-2 weight all-gather): exposed
    per_micro_batch: float  # every micro-batch, overlapping that micro-batch's compute
    bucket: float  # one bucket's transfer: the part that can never hide
    zero3: bool  # per-micro-batch traffic overlaps forward + backward (prefetch), not backward only

    def exposed(self, compute: float, backward_fraction: float, accum: int) -> float:
        """Exposed seconds given the step's compute time and the backward's share of it."""
        per_mb_compute = compute / accum
        backward = per_mb_compute * backward_fraction
        total = self.after
        if self.once:
            total += max(min(self.bucket, self.once), self.once - backward)
        if self.per_micro_batch:
            hide = per_mb_compute if self.zero3 else backward
            total += accum * max(min(self.bucket, self.per_micro_batch), self.per_micro_batch - hide)
        return total
