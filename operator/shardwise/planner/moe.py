"""Mixture of experts: expert-parallel shards, routed-token activations, all-to-all time.

Layout (Megatron-core / DeepSpeed-MoE): expert parallelism (EP) is carved out of data
parallelism, so a layout's `ep` divides its DP degree and the routed-expert count. Each EP rank
holds experts / ep routed experts, further split by TP (Megatron's default expert-TP = TP);
attention, shared experts and norms are sharded by TP as in a dense layer, the router is
replicated. ZeRO partitions expert states over the expert-data-parallel group, dp / ep ranks (the
ranks that hold the same experts), and the rest over all dp ranks.

Tokens are routed to top-k experts: an all-to-all sends each token's hidden state to the EP rank
of each of its k experts and a second one brings the outputs back, forward and backward (and
again for a recomputed forward), (ep - 1) / ep of the routed bytes crossing ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from shardwise.planner.architecture import Architecture
from shardwise.planner.errors import PlanInputError


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class LayerShards:
    """Parameters one (TP, EP) rank holds of each kind of layer."""

    dense: int  # a dense layer (leading dense layers of DeepSeek, every layer of a dense model)
    moe: int  # an MoE layer: its non-expert part + the rank's expert shard
    experts: int  # the rank's routed-expert shard of one MoE layer (included in `moe`)
    dense_quantized: int  # QLoRA: the dense layer's linear weights
    moe_quantized: int


def layer_shards(arch: Architecture, tp: int, ep: int) -> LayerShards:
    norms = arch.norms_per_layer * arch.norm_params  # replicated on TP ranks
    dense = ceil_div(arch.dense_layer_params - norms, tp) + norms
    dense_q = ceil_div(arch.dense_matmul_weights, tp)
    if not arch.moe:
        return LayerShards(dense, dense, 0, dense_q, dense_q)
    experts = ceil_div(arch.expert_params_per_layer, ep * tp)
    rest = arch.moe_layer_params - arch.expert_params_per_layer - arch.router_params - norms
    moe = ceil_div(rest, tp) + arch.router_params + norms + experts
    return LayerShards(dense, moe, experts, dense_q, ceil_div(rest, tp) + experts)


def ep_misfit(arch: Architecture | None, ep: int, dp: int) -> str | None:
    """Why `ep` cannot shard this model's experts on `dp` data-parallel ranks, or None."""
    if ep == 1:
        return None
    if arch is None or not arch.moe:
        return f"expert parallelism EP={ep} needs a mixture-of-experts model (this one has no experts)"
    if arch.experts % ep:
        return f"EP={ep} does not divide the {arch.experts} routed experts"
    if dp % ep:
        return f"EP={ep} does not divide DP={dp} (expert parallelism splits the data-parallel ranks)"
    return None


def check_expert_pin(arch: Architecture | None, ep: int) -> None:
    """Input errors of a pinned EP that do not depend on the layout (exit 2 / Planned=False)."""
    if ep > 1 and (arch is None or not arch.moe):
        raise PlanInputError(f"expert parallelism EP={ep} needs a mixture-of-experts model (no experts)")
    if arch is not None and arch.moe and arch.experts % ep:
        raise PlanInputError(f"EP={ep} does not divide the {arch.experts} routed experts")


def expert_candidates(
    arch: Architecture | None, dp: int, pinned: int | None, *, tp: int, gpus_per_node: int
) -> list[int]:
    """EP degrees the search tries: 1, the largest that keeps the all-to-all inside a node
    (tp·ep <= GPUs per node), and the largest there is (fewest experts per rank, the most memory
    saved). Degrees in between trade the same two things less well in this model (memory falls
    and all-to-all time rises with ep, stepping up once it leaves the node); they are planned
    when pinned. Three candidates instead of every divisor keep MoE searches fast."""
    if pinned is not None:
        return [pinned]
    if arch is None or not arch.moe:
        return [1]
    valid = [e for e in range(1, dp + 1) if dp % e == 0 and arch.experts % e == 0]
    intra = [e for e in valid if tp * e <= gpus_per_node]
    return sorted({1, intra[-1] if intra else 1, valid[-1]})


def moe_layer_extra_activation_bytes(
    arch: Architecture, seq: int, *, tp: int, sequence_parallel: bool, full_recompute: bool, act_bytes: int
) -> Fraction:
    """What one MoE layer saves beyond the dense-layer accounting of activations.py (which counts
    one MLP of ffn_hidden_size), per sample: the MLPs each token really passes (k routed experts
    plus the shared experts, 4e·s·f per SwiGLU width f, split by TP), the k routed copies of the
    token (dispatched inputs and outputs, 2k - 1 beyond the MLP input already counted) and the
    fp32 router logits and probabilities (8·s·E). Full recompute keeps only the layer input."""
    if not arch.moe or full_recompute:
        return Fraction(0)
    e = act_bytes
    per_width = (4 if arch.mlp == "swiglu" else 2) * e
    routed = arch.experts_per_token * arch.expert_ffn_hidden_size + arch.shared_expert_ffn_hidden_size
    mlp = Fraction(per_width * seq * (routed - arch.ffn_hidden_size), tp)
    sp = tp if sequence_parallel else 1
    tokens = Fraction(e * seq * arch.hidden_size * (2 * arch.experts_per_token - 1), sp)
    router = Fraction(8 * seq * arch.experts, sp)
    return mlp + tokens + router


def dispatch_buffer_bytes(arch: Architecture, seq: int, *, ep: int, act_bytes: int) -> int:
    """All-to-all send and receive buffers of one layer's routed tokens, per sample (EP > 1)."""
    if not arch.moe or ep <= 1:
        return 0
    return 2 * arch.experts_per_token * seq * arch.hidden_size * act_bytes


def all_to_all_seconds(
    arch: Architecture, seq: int, samples: int, moe_layers: int, *, ep: int, passes: int, act_bytes: int,
    bandwidth: float,
) -> float:  # fmt: skip
    """Time of the dispatch + combine all-to-alls of `samples` samples through `moe_layers` MoE
    layers, `passes` passes (forward 1, + backward 2, + a recomputed forward 3)."""
    if not arch.moe or ep <= 1 or moe_layers == 0:
        return 0.0
    routed = float(samples * seq * arch.experts_per_token * arch.hidden_size * act_bytes)
    return 2 * passes * moe_layers * routed * (ep - 1) / ep / bandwidth
