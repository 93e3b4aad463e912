"""One parallel layout: TP x PP x DP degrees, ZeRO stage, micro-batch, checkpointing, offload."""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.planner.activations import Checkpointing
from shardwise.planner.request import Offload


@dataclass(frozen=True, slots=True)
class Layout:
    """Field names are those of the JSON contract ("layout" in `shardwise plan --json`)."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch: int
    grad_accum: int  # global_batch = micro_batch * grad_accum * dp
    checkpointing: Checkpointing
    sequence_parallel: bool
    offload: Offload
    nodes: int
    gpus_per_node: int
    # Expert parallelism (MoE): each group of `ep` data-parallel ranks splits the routed experts;
    # it lives inside DP (Megatron / DeepSpeed-MoE), so it adds no GPUs.
    ep: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp

    def to_dict(self) -> dict[str, object]:
        return {
            "tp": self.tp,
            "pp": self.pp,
            "dp": self.dp,
            "zero_stage": self.zero_stage,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "checkpointing": self.checkpointing,
            "sequence_parallel": self.sequence_parallel,
            "offload": self.offload,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "ep": self.ep,
        }

    def describe(self) -> str:
        """One line for humans, e.g. `TP2 x PP1 x DP4, ZeRO-1, micro 1 x accum 8, ckpt full`."""
        extras = [f"ZeRO-{self.zero_stage}", f"micro {self.micro_batch} x accum {self.grad_accum}"]
        extras.append(f"ckpt {self.checkpointing}")
        if self.sequence_parallel:
            extras.append("SP")
        if self.offload != "none":
            extras.append(f"offload {self.offload}")
        ep = f" (EP{self.ep})" if self.ep > 1 else ""
        return f"TP{self.tp} x PP{self.pp} x DP{self.dp}{ep}, " + ", ".join(extras)
