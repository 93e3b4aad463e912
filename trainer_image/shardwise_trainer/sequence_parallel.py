"""Ulysses sequence parallelism for a pretrained model: DeepSpeed's attention wrapper, each rank's
slice of the sequence, and the loss share that makes the SP group's gradients the full sample's.

``sp`` consecutive ranks share every sample (same DP rank, same batches). Each feeds the model
its ``1/sp`` slice of the sequence with the slice's true position ids; DeepSpeed's
``UlyssesSPAttentionHF`` (registered over transformers' ``sdpa`` attention before the model
loads) exchanges attention heads by all-to-all, so every rank attends over the whole sequence
for ``heads/sp`` heads. DeepSpeed then sums the gradients over the SP group and averages them
over DP, so each rank's loss is its slice's summed token loss over the group's trained-token
count: the shares add up to the sample's mean loss and their gradients to its gradient.

Except under ZeRO-3: DeepSpeed 0.19's coalesced reduce-scatter there averages over the whole
SP × DP group (the ZeRO-1/2 and contiguous paths divide by DP only), which would leave the
gradients ``1/sp`` of the sample's; measured, SP2 ZeRO-3 then drifted 1.8e-3 from the single
process by step 8. Under ZeRO-3 the loss share's gradient is scaled by ``sp`` (its value is not),
and ``dsconfig`` keeps ZeRO-3's reduce-scatter on so every bucket takes that one path.
"""

# ruff: noqa: PLC0415 - torch / deepspeed / transformers load lazily
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The attention implementation Ulysses wraps (eager needs a 4-D mask and is refused by DeepSpeed).
CORE_ATTENTION = "sdpa"


@dataclass
class SequenceShard:
    """This rank's place in its SP group."""

    size: int
    rank: int
    group: Any  # torch.distributed.ProcessGroup
    #: What the loss share's gradient is multiplied by (its value is left alone).
    gradient_scale: float = 1.0

    def slice(self, ids: Any, labels: Any, position_ids: Any | None) -> tuple[Any, Any, Any]:
        """This rank's slice of a micro-batch (``position_ids`` None: 0..L-1 for every row)."""
        import torch

        length = ids.shape[-1]
        if length % self.size:
            raise ValueError(f"sequence of {length} tokens does not split into sp={self.size} slices")
        if position_ids is None:
            position_ids = torch.arange(length, device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
        part = length // self.size
        cut = slice(self.rank * part, (self.rank + 1) * part)
        return ids[:, cut].contiguous(), labels[:, cut].contiguous(), position_ids[:, cut].contiguous()

    def loss_share(self, logits: Any, labels: Any) -> Any:
        """This slice's summed token loss over the SP group's trained tokens (labels -100 skipped)."""
        import torch
        import torch.distributed as dist
        from torch.nn import functional

        summed = functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
        )
        count = (labels != -100).sum().to(torch.float32)
        dist.all_reduce(count, group=self.group)  # no gradient flows through the count
        # A filler batch with no trained token anywhere in the group: NaN, as the mean loss is.
        share = summed / count
        if self.gradient_scale != 1.0 and share.requires_grad:
            share = _scale_gradient(share, self.gradient_scale)
        return share


def _scale_gradient(value: Any, factor: float) -> Any:
    """``value`` unchanged, its gradient multiplied by ``factor``."""
    return value * factor - (value * (factor - 1.0)).detach()


def register(model_dir: str, *, sp: int, micro_batch: int, sequence_length: int) -> Any:
    """Install DeepSpeed's Ulysses attention for ``sp`` ranks; returns the mpu DeepSpeed gets.

    Must run before the model is loaded, which then loads with ``attn_implementation="sdpa"``."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model_dir,
        core_attn_implementation=CORE_ATTENTION,
        sequence_parallel_size=sp,
        micro_batch_size=micro_batch,
        seq_length=sequence_length,
        # Validation rows and the training rows share the layout's length, but the wrapper's
        # fixed-length path gains nothing measurable on CPU; variable keeps any length working.
        seq_length_is_variable=True,
    )


def shard_of(mpu: Any, *, zero_stage: int) -> SequenceShard:
    """This rank's :class:`SequenceShard` from the mpu :func:`register` returned."""
    size = int(mpu.get_sequence_parallel_world_size())
    return SequenceShard(
        size=size,
        rank=int(mpu.get_sequence_parallel_rank()),
        group=mpu.get_sequence_parallel_group(),
        gradient_scale=float(size) if zero_stage == 3 else 1.0,
    )
