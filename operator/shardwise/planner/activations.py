"""Activation memory per transformer layer and per pipeline stage (Korthikanti et al. 2022).

Accounting (memory-model.md §3; arXiv:2205.05198 §4, Table 2): every tensor a layer saves for
its backward pass, at its dtype size e (2 for 16-bit activations), 1 byte per dropout-mask
element. For a GPT block (4h GeLU MLP, multi-head attention, dropout), no parallelism:

    attention  QKV input e·sbh, Q and K for QK^T 2e·sbh, softmax output e·as²b, its dropout
               mask as²b, dropout output e·as²b (for attention-over-V), V e·sbh, output
               projection input e·sbh, output dropout mask sbh   -> 11sbh + 5as²b  (e = 2)
    MLP        first linear input e·sbh, GeLU input e·sb(4h), GeLU output e·sb(4h),
               dropout mask sbh                                      -> 19sbh
    two norms  inputs 2e·sbh                                          -> 4sbh
    total      sbh(34 + 5as/h)                                        (Table 2, row 1)

Under tensor parallelism t (Megatron), the norm inputs, the QKV and MLP inputs and the two
dropout masks (10sbh) are replicated on every TP rank; the other 24sbh and the 5as²b attention
core are split by t. Sequence parallelism splits the replicated 10sbh too; selective recompute
drops the attention core; full recompute keeps only the layer input 2sbh.

Llama-style block (SwiGLU with ffn size f, grouped-query attention with kv heads, RMSNorm, no
dropout), the same accounting term by term:

    attention  QKV input e·sbh; Q e·sbh; K and V e·sbh·(kv/a) each (GQA keeps kv heads: K/V are
               computed at kv-head width and read by each head group; RoPE needs only its
               cos/sin tables in backward); softmax output e·as²b (no dropout: the same tensor
               feeds softmax backward and attention-over-V); output projection input e·sbh
    MLP        input e·sbh; gate output (SiLU input) e·sbf; SiLU output e·sbf; up output e·sbf;
               product (down-projection input) e·sbf                -> e·sbh + 4e·sbf
    two norms  RMSNorm inputs 2e·sbh (the per-row statistics are O(sb) and ignored, as in the
               paper for LayerNorm)

    so with e = 2: replicated 8sbh, split (4 + 4·kv/a)·sbh + 8·sbf, attention core 2as²b.
    (A GPT block through the same code: replicated 8 + 2 masks = 10, split 8 + 16 = 24, core 5.)

Selective recompute is what FlashAttention does implicitly (the s² core is recomputed in the
backward pass), so "selective" also stands for a FlashAttention run.

Two accountings (``accounting``): ``paper`` is the above, term for term (Korthikanti's Table 2;
the unit tests hold it to the paper). ``runtime`` is what shardwise's trainer saves, measured with
``torch.autograd.graph.saved_tensors_hooks`` on CPU (tests/trainer/test_trainer_activations.py,
docs/planner.md, benchmarks/results/activations.md), and is what the planner uses:

* attention runs through a fused kernel (``scaled_dot_product_attention``; Hugging Face models
  load with ``attn_implementation="sdpa"``): no s² tensor is kept; the kernel keeps q, k, v (kv
  heads at their own width), its output (the output projection's input) and the fp32
  log-sum-exp per head and row, 4·a·s·b;
* RMSNorm (as Hugging Face's Llama / Qwen2 / Mistral and the built-in model compute it) upcasts
  its input to fp32 for the statistics and keeps that copy, the 16-bit normalised output and the
  fp32 reciprocal RMS per row: (4 + e)·sbh + 4·sb per norm; LayerNorm keeps its input and fp32
  mean / rstd per row: e·sbh + 8·sb;
* the 2·s·d RoPE cos / sin tables are O(s·d) and ignored (under 3 % of a layer even for the
  64-wide test model).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from shardwise.planner.architecture import Architecture

Checkpointing = Literal["none", "selective", "full"]
CHECKPOINTING: tuple[Checkpointing, ...] = ("none", "selective", "full")
Accounting = Literal["paper", "runtime"]
#: The accounting the planner's memory model uses (module docstring).
RUNTIME: Accounting = "runtime"


@dataclass(frozen=True, slots=True)
class LayerCoefficients:
    """Bytes per layer = s·b·h·(replicated + split/t) + (core·a·s² + stats·a·s)·b/t, before
    parallel choices."""

    replicated: Fraction  # per s·b·h, kept whole on every TP rank unless sequence-parallel
    split: Fraction  # per s·b·h, split by TP
    core: Fraction  # per a·s²·b (the attention score tensors), split by TP
    layer_input: Fraction  # per s·b·h, what full recompute keeps
    stats: Fraction = Fraction(0)  # per a·s·b (fused attention's fp32 log-sum-exp), split by TP


def norm_bytes(arch: Architecture, act_bytes: int, accounting: Accounting) -> Fraction:
    """What one norm keeps for backward, per s·b·h (module docstring)."""
    e = Fraction(act_bytes)
    if accounting == "paper":
        return e
    per_row = Fraction(4 if arch.norm == "rmsnorm" else 8, arch.hidden_size)
    return (4 + e if arch.norm == "rmsnorm" else e) + per_row


def layer_coefficients(
    arch: Architecture, act_bytes: int = 2, accounting: Accounting = "paper"
) -> LayerCoefficients:
    """The coefficients of the module docstring for this block and activation dtype size."""
    e = Fraction(act_bytes)
    mask = Fraction(1 if arch.dropout else 0)  # dropout masks are 1 byte per element
    kv_ratio = Fraction(arch.kv_heads, arch.heads)
    f_ratio = Fraction(arch.ffn_hidden_size, arch.hidden_size)
    # Two norms, the QKV input and the MLP input, the two output dropout masks.
    replicated = 2 * norm_bytes(arch, act_bytes, accounting) + 2 * e + 2 * mask
    # Q, K, V, output projection input.
    attention_split = e * (2 + 2 * kv_ratio)
    # GeLU: its input and output (each f wide); SwiGLU: gate, SiLU output, up, product.
    mlp_split = (2 if arch.mlp == "gelu" else 4) * e * f_ratio
    if accounting == "runtime":  # fused attention: no s² tensor, an fp32 log-sum-exp per row
        return LayerCoefficients(replicated, attention_split + mlp_split, Fraction(0), e, Fraction(4))
    # Softmax output, plus (with dropout) its mask and the dropout output.
    core = e + mask + e * mask
    return LayerCoefficients(replicated, attention_split + mlp_split, core, e)


def layer_activation_bytes(
    arch: Architecture,
    seq: int,
    micro_batch: int,
    *,
    tp: int = 1,
    sequence_parallel: bool = False,
    checkpointing: Checkpointing = "none",
    act_bytes: int = 2,
    accounting: Accounting = "paper",
) -> Fraction:
    """Bytes one transformer layer keeps for backward (Korthikanti 2022 Table 2 for GPT blocks)."""
    c = layer_coefficients(arch, act_bytes, accounting)
    sbh = Fraction(seq * micro_batch * arch.hidden_size)
    if checkpointing == "full":
        # Only the layer input (Table 2, last row); sequence-parallel runs keep it sequence-sharded.
        return sbh * c.layer_input / (tp if sequence_parallel else 1)
    replicated = c.replicated / tp if sequence_parallel else c.replicated
    total = sbh * (replicated + c.split / tp)
    if checkpointing == "none":
        total += (c.core * seq + c.stats) * arch.heads * seq * micro_batch / tp
    return total


def recompute_working_set_bytes(
    arch: Architecture,
    seq: int,
    micro_batch: int,
    *,
    tp: int,
    sequence_parallel: bool,
    checkpointing: Checkpointing,
    act_bytes: int = 2,
    accounting: Accounting = "paper",
) -> Fraction:
    """Transient memory of recomputation: with full recompute one layer's activations are rebuilt
    in the backward pass (one layer of "none"); with selective, one layer's attention core.
    Not in Korthikanti's table (which counts stored activations); a separate, explicit term."""
    if checkpointing == "none":
        return Fraction(0)
    if checkpointing == "full":
        return layer_activation_bytes(
            arch, seq, micro_batch, tp=tp, sequence_parallel=sequence_parallel, act_bytes=act_bytes,
            accounting=accounting,
        )  # fmt: skip
    c = layer_coefficients(arch, act_bytes, accounting)
    return (c.core * seq + c.stats) * arch.heads * seq * micro_batch / tp


def embedding_activation_bytes(
    arch: Architecture, seq: int, micro_batch: int, tp: int, sequence_parallel: bool
) -> Fraction:
    """First stage, per micro-batch in flight: the embedding-dropout mask (Korthikanti eq. 4)."""
    if not arch.dropout:
        return Fraction(0)
    return Fraction(seq * micro_batch * arch.hidden_size, tp if sequence_parallel else 1)


def output_activation_bytes(
    arch: Architecture,
    seq: int,
    micro_batch: int,
    *,
    tp: int,
    sequence_parallel: bool,
    act_bytes: int = 2,
    accounting: Accounting = "paper",
) -> Fraction:
    """Last stage: final norm and output-layer input (e·sbh each under the paper's accounting,
    /t with sequence parallelism) plus the fp32 logits of the vocabulary-parallel cross entropy,
    4·s·b·v/t (Korthikanti eq. 4: 4sbh/t·(1 + v/h) with SP)."""
    sbh = Fraction(seq * micro_batch * arch.hidden_size)
    per_sbh = norm_bytes(arch, act_bytes, accounting) + act_bytes
    inputs = per_sbh * sbh / (tp if sequence_parallel else 1)
    return inputs + Fraction(4 * seq * micro_batch * arch.vocab_size, tp)


def in_flight_micro_batches(stage: int, pp: int, micro_batches: int) -> int:
    """1F1B: stage i holds the activations of min(p - i, m) micro-batches (Korthikanti eq. 5:
    the first stage keeps p in flight, so it holds L layers' worth whatever p is)."""
    return max(1, min(pp - stage, micro_batches))


def interleave_factor(pp: int, virtual_stages: int) -> Fraction:
    """Extra first-stage activation memory of the interleaved schedule, 1 + (p-1)/(p·m)
    (Korthikanti §4.2.3). Plain 1F1B (virtual_stages = 1) has factor 1. DeepSpeed's pipeline
    engine runs plain 1F1B, so the search uses 1; the factor is here for Megatron-style runs."""
    if virtual_stages <= 1 or pp <= 1:
        return Fraction(1)
    return 1 + Fraction(pp - 1, pp * virtual_stages)


def kv_cache_bytes(
    arch: Architecture, layers: int, seq: int, batch: int, *, tp: int, dtype_bytes: int
) -> int:
    """Inference KV cache: 2 (K and V) · layers · kv_heads · head_dim · s · b · dtype, kv heads
    split by TP (memory-model.md §5)."""
    return 2 * layers * arch.kv_heads * arch.head_dim * seq * batch * dtype_bytes // tp
