"""Validation loss of the engine on the validation rows, every rank taking part."""

# ruff: noqa: PLC0415 - torch loads lazily, as in train.py
from __future__ import annotations

from typing import Any

from shardwise_trainer.contract import Layout


def evaluate(engine: Any, source: Any, rows: Any, *, layout: Layout, dp_rank: int, device: Any) -> float:
    """Mean loss over the trained tokens of every validation row (all ranks take part: under
    ZeRO-3 or SP each forward is a collective)."""
    import torch
    import torch.distributed as dist

    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * tokens, tokens)
    engine.eval()
    with torch.no_grad():
        for batch in source.eval_batches(rows, dp_rank=dp_rank, dp=layout.dp, micro_batch=layout.micro_batch,
                                         device=device):  # fmt: skip
            tokens = int((batch[1] != -100).sum())
            loss = engine(*batch)
            if tokens:  # a filler batch (loss NaN) counts for nothing
                # Under SP each of the group's ranks returns its share of the batch's mean loss
                # (the shares add up): the group's tokens are counted once, split over its ranks.
                total[0] += float(loss) * tokens
                total[1] += tokens / layout.sp
    engine.train()
    if dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1]) if float(total[1]) else float("nan")
