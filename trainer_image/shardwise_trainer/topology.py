"""Process groups of the layout (PP, DP, TP) in the contract's rank order, and the DeepSpeed ``mpu``.

``rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank`` (contract.rank_of). A Ulysses
sequence-parallel group takes the TP slot (consecutive ranks; it runs with tp = pp = 1, and
DeepSpeed's Ulysses mpu builds the same groups): ``rank = dp_rank * sp + sp_rank``. Every rank creates
every group in the same order (``torch.distributed.new_group`` is collective), keeps its own.
The :class:`Mpu` object is what DeepSpeed calls a Megatron-style model-parallel unit: handed to
``deepspeed.initialize(mpu=...)`` it makes ZeRO partition over the DP group only and makes the
gradient-norm computation reduce over the TP group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from shardwise_trainer.contract import coords_of, rank_of

ProcessGroup = Any  # torch.distributed.ProcessGroup (its stub is not generic-friendly)


@dataclass
class Topology:
    """This rank's coordinates and its TP / DP / PP groups."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    dp_rank: int
    pp_rank: int
    tp_group: ProcessGroup
    dp_group: ProcessGroup
    pp_group: ProcessGroup
    tp_ranks: list[int]
    dp_ranks: list[int]
    pp_ranks: list[int]
    sp: int = 1
    sp_rank: int = 0

    @property
    def is_last_stage(self) -> bool:
        """True on the last pipeline stage (where the loss is computed)."""
        return self.pp_rank == self.pp - 1


def build_topology(tp: int, pp: int, dp: int, sp: int = 1) -> Topology:
    """Create the groups for a tp × sp × pp × dp layout; ``dist`` must be initialised with that world.

    With sp > 1 (tp = pp = 1) the TP fields hold this rank alone and ``sp_rank`` its place in the
    SP group, whose process group DeepSpeed's Ulysses mpu owns."""
    world = dist.get_world_size()
    if world != tp * sp * pp * dp:
        raise RuntimeError(
            f"the layout needs tp*sp*pp*dp = {tp}*{sp}*{pp}*{dp} = {tp * sp * pp * dp} processes, "
            f"torchrun started {world}"
        )
    if sp > 1 and (tp > 1 or pp > 1):
        raise RuntimeError(f"sp={sp} runs with tp=1, pp=1 (got tp={tp}, pp={pp})")
    if sp > 1:
        return _sequence_topology(sp, dp)
    rank = dist.get_rank()
    pp_rank, dp_rank, tp_rank = coords_of(rank, tp=tp, dp=dp)
    groups: dict[str, tuple[ProcessGroup, list[int]]] = {}
    # TP groups: fixed (pp, dp), varying tp.
    for p in range(pp):
        for d in range(dp):
            ranks = [rank_of(p, d, t, tp=tp, dp=dp) for t in range(tp)]
            g = dist.new_group(ranks)
            if rank in ranks:
                groups["tp"] = (g, ranks)
    # DP groups: fixed (pp, tp), varying dp.
    for p in range(pp):
        for t in range(tp):
            ranks = [rank_of(p, d, t, tp=tp, dp=dp) for d in range(dp)]
            g = dist.new_group(ranks)
            if rank in ranks:
                groups["dp"] = (g, ranks)
    # PP groups: fixed (dp, tp), varying pp.
    for d in range(dp):
        for t in range(tp):
            ranks = [rank_of(p, d, t, tp=tp, dp=dp) for p in range(pp)]
            g = dist.new_group(ranks)
            if rank in ranks:
                groups["pp"] = (g, ranks)
    return Topology(
        rank=rank,
        world_size=world,
        tp=tp,
        pp=pp,
        dp=dp,
        tp_rank=tp_rank,
        dp_rank=dp_rank,
        pp_rank=pp_rank,
        tp_group=groups["tp"][0],
        dp_group=groups["dp"][0],
        pp_group=groups["pp"][0],
        tp_ranks=groups["tp"][1],
        dp_ranks=groups["dp"][1],
        pp_ranks=groups["pp"][1],
    )


def _sequence_topology(sp: int, dp: int) -> Topology:
    rank = dist.get_rank()
    groups: dict[str, tuple[ProcessGroup, list[int]]] = {}
    for r in range(sp * dp):  # TP and PP groups of one rank each
        g = dist.new_group([r])
        if r == rank:
            groups["one"] = (g, [r])
    for s in range(sp):  # DP groups: the same slice of every replica's samples
        ranks = [d * sp + s for d in range(dp)]
        g = dist.new_group(ranks)
        if rank in ranks:
            groups["dp"] = (g, ranks)
    return Topology(
        rank=rank,
        world_size=sp * dp,
        tp=1,
        pp=1,
        dp=dp,
        tp_rank=0,
        dp_rank=rank // sp,
        pp_rank=0,
        tp_group=groups["one"][0],
        dp_group=groups["dp"][0],
        pp_group=groups["one"][0],
        tp_ranks=groups["one"][1],
        dp_ranks=groups["dp"][1],
        pp_ranks=groups["one"][1],
        sp=sp,
        sp_rank=rank % sp,
    )


class Mpu:
    """Megatron-style model-parallel unit for ``deepspeed.initialize(mpu=...)`` (no pipeline).

    "Model parallel" here is tensor parallel: with pipeline parallelism DeepSpeed's
    ``PipelineModule`` brings its own grid (same topology, same rank order) and this object is
    not used.
    """

    def __init__(self, topo: Topology) -> None:
        self._t = topo

    # Megatron / DeepSpeed names -------------------------------------------------------------
    def get_model_parallel_rank(self) -> int:
        return self._t.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self._t.tp

    def get_model_parallel_group(self) -> ProcessGroup:
        return self._t.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self._t.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._t.tp

    def get_tensor_model_parallel_group(self) -> ProcessGroup:
        return self._t.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._t.tp_ranks[0]

    def get_data_parallel_rank(self) -> int:
        return self._t.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._t.dp

    def get_data_parallel_group(self) -> ProcessGroup:
        return self._t.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._t.dp_ranks)

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._t.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._t.pp

    def get_pipeline_model_parallel_group(self) -> ProcessGroup:
        return self._t.pp_group
