"""Which row each DP rank trains in each step: a seeded permutation per epoch, by global sample number.

The stream of global sample numbers is the one of :mod:`.tokens`::

    j = step * global_batch + (micro * dp + dp_rank) * micro_batch + i

and sample ``j`` is row ``perm(epoch)[j mod rows]`` with ``epoch = j // rows`` and ``perm(e)`` a
permutation drawn from ``(seed, e)``. So within a step the DP ranks take disjoint rows, the rows
of epoch ``e`` are exactly the samples ``e*rows … (e+1)*rows-1`` (every row once), and the data
position is a function of the step alone: a run resumed from a checkpoint of step ``k`` trains
the rows an uninterrupted run would have trained from step ``k`` on, with no cursor stored — and
for any DP degree, since ``j`` does not depend on the layout.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def global_sample(
    *, step: int, micro: int, dp_rank: int, i: int, dp: int, micro_batch: int, global_batch: int
) -> int:
    """Global sample number of element ``i`` of micro-batch ``micro`` of ``step`` on ``dp_rank``."""
    return step * global_batch + (micro * dp + dp_rank) * micro_batch + i


@lru_cache(maxsize=4)
def epoch_permutation(rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of ``epoch`` (read-only)."""
    perm = np.random.default_rng([seed, epoch]).permutation(rows)
    perm.setflags(write=False)
    return perm


def row_of(j: int, *, rows: int, seed: int) -> int:
    """Row trained as global sample ``j``."""
    if rows <= 0:
        raise ValueError("no rows to train on")
    epoch, pos = divmod(j, rows)
    return int(epoch_permutation(rows, seed, epoch)[pos])


def micro_batch_rows(
    *, step: int, micro: int, dp_rank: int, dp: int, micro_batch: int, global_batch: int, rows: int, seed: int
) -> list[int]:
    """Rows of one micro-batch of ``step`` on ``dp_rank``."""
    first = global_sample(
        step=step,
        micro=micro,
        dp_rank=dp_rank,
        i=0,
        dp=dp,
        micro_batch=micro_batch,
        global_batch=global_batch,
    )
    return [row_of(first + i, rows=rows, seed=seed) for i in range(micro_batch)]


def eval_rows(*, rows: int, dp_rank: int, dp: int, micro_batch: int) -> list[list[int | None]]:
    """Validation micro-batches of ``dp_rank``: rows ``dp_rank, dp_rank + dp, …`` in file order,
    the same number of batches on every rank (None = a filler row that counts for nothing), since
    ZeRO-3 forwards are collectives every rank must join."""
    per_batch = dp * micro_batch
    batches = -(-rows // per_batch) if rows else 0
    out: list[list[int | None]] = []
    for b in range(batches):
        batch: list[int | None] = []
        for i in range(micro_batch):
            r = b * per_batch + i * dp + dp_rank
            batch.append(r if r < rows else None)
        out.append(batch)
    return out
