"""Fine-tuning methods: which parameters train (LoRA, QLoRA, freeze) and what frozen weights cost."""

from __future__ import annotations

from fractions import Fraction

from shardwise.planner import capabilities
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
    parameters (Hu et al. 2021; memory-model.md §5). Targets that are one fused module in the
    family (ChatGLM's query_key_value: q, k, v) are one matrix: d_out is the sum, d_in shared —
    what peft builds on that module (capabilities.LORA_MODULES)."""
    shapes = lora_matrix_shapes(arch)
    for target in targets:
        if target not in shapes:
            raise PlanInputError(f"LoRA target {target!r} does not exist in a {arch.mlp} block")
    modules = capabilities.lora_modules(arch.family, targets)
    if isinstance(modules, str):
        raise PlanInputError(modules)
    table = capabilities.LORA_MODULES[capabilities.LORA_FAMILY_ALIASES[arch.family]]
    total = 0
    for module in modules:
        members = [t for t in targets if table[t] == module]
        d_in = shapes[members[0]][0]
        d_out = sum(shapes[t][1] for t in members)
        total += rank * (d_in + d_out)
    return total


def first_trainable_layer(layers: int, trainable_fraction: float) -> int:
    """freeze: the last ceil(fraction · L) layers train (at least one); earlier ones are frozen,
    and no gradient flows below the first trainable layer."""
    trainable = max(1, -(-round(trainable_fraction * layers * 1_000_000) // 1_000_000))
    return layers - min(layers, trainable)
