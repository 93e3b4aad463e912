"""Fine-tuning methods: which parameters train (LoRA, QLoRA, freeze) and what frozen weights cost."""

from __future__ import annotations

from fractions import Fraction

from shardwise.planner.architecture import Architecture
from shardwise.planner.errors import PlanInputError

# QLoRA (Dettmers et al. 2023, arXiv:2305.14314 §3): NF4 weights, 4 bits, with double
# quantization of the block constants: an 8-bit absmax per 64 weights plus an fp32 constant per
# 256 of those blocks = 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.
QLORA_BITS_PER_PARAM = Fraction(4) + Fraction(8, 64) + Fraction(32, 64 * 256)
QLORA_BYTES_PER_PARAM = QLORA_BITS_PER_PARAM / 8


def lora_matrix_shapes(arch: Architecture) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each matrix LoRA can target in one layer."""
    h, f, kv = arch.hidden_size, arch.ffn_hidden_size, arch.kv_dim
    shapes = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "up": (h, f), "down": (f, h)}
    if arch.mlp == "swiglu":
        shapes["gate"] = (h, f)
    return shapes


def lora_params_per_layer(arch: Architecture, rank: int, targets: tuple[str, ...]) -> int:
    """LoRA rank r on a d_in x d_out matrix adds A (r x d_in) and B (d_out x r): r·(d_in + d_out)
    parameters (Hu et al. 2021; memory-model.md §5)."""
    shapes = lora_matrix_shapes(arch)
    total = 0
    for target in targets:
        if target not in shapes:
            raise PlanInputError(f"LoRA target {target!r} does not exist in a {arch.mlp} block")
        d_in, d_out = shapes[target]
        total += rank * (d_in + d_out)
    return total


def first_trainable_layer(layers: int, trainable_fraction: float) -> int:
    """freeze: the last ceil(fraction · L) layers train (at least one); earlier ones are frozen,
    and no gradient flows below the first trainable layer."""
    trainable = max(1, -(-round(trainable_fraction * layers * 1_000_000) // 1_000_000))
    return layers - min(layers, trainable)
