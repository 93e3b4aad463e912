"""A GPT / Llama-style causal LM built from ``layout["model"]["architecture"]``, tensor-parallel.

Tensor parallelism is Megatron-style, written out with explicit autograd functions over the TP
process group (``copy_to_tp``: identity forward / all-reduce backward; ``reduce_from_tp``:
all-reduce forward / identity backward). Why not torch DTensor: these two collectives are all a
TP transformer needs, they run on gloo and NCCL alike, compose with DeepSpeed ZeRO (which sees
plain tensors) and PipelineModule, and make the bytes each rank holds exact and obvious.

* Attention: q / k / v column-parallel split by heads (GQA: ``heads/tp`` query heads and
  ``kv_heads/tp`` kv heads per rank), o row-parallel.
* MLP: SwiGLU gate / up (or GeLU fc1) column-parallel, down (fc2) row-parallel.
* Embedding and LM head are vocab-parallel (rows ``V/tp``); the loss is a vocab-parallel cross
  entropy, so full logits are never gathered. Tied embeddings share the embedding's shard.
* Norms, learned position embeddings and row-parallel biases are replicated on the TP group.

Initialisation is deterministic and layout-independent: each parameter's FULL tensor is drawn
from a generator seeded by (seed, global parameter name) and this rank keeps its slice. So a
TP2 / PP2 / DP2 run starts from exactly the weights of the single-process run. (The full tensor
of one parameter exists briefly on the host while slicing; one parameter at a time.)

The model is expressed as a list of layers ``[Embed, Block 0..L-1, FinalNorm, Head]`` that
either run in sequence (:class:`SequentialLM`, pp = 1) or become DeepSpeed ``LayerSpec`` /
``TiedLayerSpec`` entries of a ``PipelineModule`` (pp > 1).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.checkpoint import checkpoint

from shardwise_trainer.contract import Architecture

INIT_STD = 0.02
ROPE_THETA = 10000.0
DROPOUT_P = 0.1


@dataclass(frozen=True)
class TPContext:
    """The tensor-parallel group as the layers see it."""

    size: int
    rank: int
    group: Any  # torch.distributed.ProcessGroup or None when size == 1


# ---------------------------------------------------------------------------------------------
# Tensor-parallel collectives
# ---------------------------------------------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_tp(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward (entry of a column-parallel region)."""
    return x if tp.size == 1 else _CopyToTP.apply(x, tp.group)


def reduce_from_tp(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """All-reduce forward, identity backward (exit of a row-parallel region)."""
    return x if tp.size == 1 else _ReduceFromTP.apply(x, tp.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross entropy over logits split by vocabulary across the TP group (Megatron's)."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group: Any
    ) -> torch.Tensor:
        logits = logits.float()
        lmax = logits.max(dim=-1)[0]
        dist.all_reduce(lmax, op=dist.ReduceOp.MAX, group=group)
        logits = logits - lmax.unsqueeze(-1)
        vocab_local = logits.shape[-1]
        outside = (target < vocab_start) | (target >= vocab_start + vocab_local)
        local_target = (target - vocab_start).masked_fill(outside, 0)
        predicted = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(predicted, group=group)
        exp = logits.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - predicted
        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        softmax, outside, local_target = ctx.saved_tensors
        g = softmax.clone()
        hit = (~outside).to(g.dtype)
        g.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        return g * grad.unsqueeze(-1), None, None, None


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """Mean next-token loss; ``logits`` hold this rank's vocabulary shard when tp > 1."""
    if tp.size == 1:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    vocab_start = tp.rank * logits.shape[-1]
    per_token: torch.Tensor = _VocabParallelCrossEntropy.apply(logits, labels, vocab_start, tp.group)
    return per_token.mean()


# ---------------------------------------------------------------------------------------------
# Deterministic, layout-independent initialisation
# ---------------------------------------------------------------------------------------------


def _full_normal(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.normal(0.0, std, shape, generator=gen)


def shard_param(
    name: str, shape: tuple[int, ...], *, std: float, seed: int, tp: TPContext, split_dim: int | None
) -> nn.Parameter:
    """The slice ``tp.rank`` of the full deterministic tensor ``name`` (split along ``split_dim``)."""
    full = _full_normal(name, shape, std, seed)
    if split_dim is not None and tp.size > 1:
        full = full.chunk(tp.size, dim=split_dim)[tp.rank].clone()  # own storage, not a view
    param = nn.Parameter(full)
    param.tp_sharded = split_dim is not None and tp.size > 1  # type: ignore[attr-defined]
    # At any TP size: how a checkpoint's slices merge and re-split when TP changes on resume.
    param.tp_split_dim = split_dim  # type: ignore[attr-defined]
    return param


def mark_for_grad_norm(module: nn.Module, *, tp_rank: int, pipeline_stage: int | None) -> None:
    """Tell DeepSpeed's gradient-norm code which rank counts each parameter, exactly once.

    DeepSpeed counts a parameter's gradient on a rank when ``p.model_parallel`` (Megatron's
    ``is_model_parallel_parameter``) is set, or when the rank is model-parallel rank 0, then sums
    over the model-parallel group. Under pipeline parallelism that group spans the stages and
    only stage 0 is rank 0, so unmarked parameters of later stages would be left out of the norm
    (gradient clipping would differ from the single-process run). Rule: a parameter counts here
    when it is TP-sharded, or replicated and this is TP rank 0; the copy of tied embeddings on
    a later pipeline stage never counts (``ds_pipe_replicated`` makes ZeRO skip it too).
    """
    for name, p in module.named_parameters():
        tied_copy = pipeline_stage not in (None, 0) and name.startswith("tied_modules.")
        p.model_parallel = (getattr(p, "tp_sharded", False) or tp_rank == 0) and not tied_copy  # type: ignore[attr-defined]
        if tied_copy:
            p.ds_pipe_replicated = True  # type: ignore[attr-defined]


def linear_bias(arch: Architecture) -> bool:
    """LayerNorm blocks (GPT-2 / Megatron GPT) carry a bias on every linear layer; RMSNorm blocks
    (Llama, Qwen2, …) only on q / k / v when ``qkv_bias`` is set — the planner's convention."""
    return arch.norm == "layernorm"


class Norm(nn.Module):
    """RMSNorm or LayerNorm (weight, plus bias for LayerNorm); replicated on the TP group."""

    def __init__(self, hidden: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-5)
        # One fp32 copy, as Hugging Face's Llama RMSNorm does: the planner counts what it keeps.
        x32 = x.float()
        var = x32.pow(2).mean(-1, keepdim=True)
        return (x32 * torch.rsqrt(var + 1e-5)).to(x.dtype) * self.weight


class ParallelLinear(nn.Module):
    """Column- (output split) or row-parallel (input split) linear over the TP group."""

    def __init__(
        self,
        name: str,
        in_features: int,
        out_features: int,
        *,
        mode: str,
        bias: bool,
        std: float,
        seed: int,
        tp: TPContext,
    ) -> None:
        super().__init__()
        self.mode, self.tp = mode, tp
        # Weight layout [out, in]: column-parallel splits dim 0, row-parallel dim 1.
        split = 0 if mode == "column" else 1
        self.weight = shard_param(
            f"{name}.weight", (out_features, in_features), std=std, seed=seed, tp=tp, split_dim=split
        )
        if bias:
            # Column: bias split with the outputs; row: full bias added once after the reduce.
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.zeros(out_features // tp.size if mode == "column" else out_features)
            )
            self.bias.tp_sharded = mode == "column" and tp.size > 1  # type: ignore[attr-defined]
            self.bias.tp_split_dim = 0 if mode == "column" else None  # type: ignore[attr-defined]
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "column":
            return F.linear(copy_to_tp(x, self.tp), self.weight, self.bias)
        out = reduce_from_tp(F.linear(x, self.weight), self.tp)
        return out if self.bias is None else out + self.bias


def _rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on [b, heads, s, d] (positions 0..s-1)."""
    seq, dim = x.shape[-2], x.shape[-1]
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32, device=x.device), inv)
    cos = torch.cat([freqs, freqs], dim=-1).cos().to(x.dtype)
    sin = torch.cat([freqs, freqs], dim=-1).sin().to(x.dtype)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Block(nn.Module):
    """One pre-norm transformer block; ``index`` is its GLOBAL layer number (names the weights)."""

    def __init__(self, arch: Architecture, index: int, tp: TPContext, seed: int, checkpointing: str) -> None:
        super().__init__()
        self.arch, self.tp, self.checkpointing = arch, tp, checkpointing
        h, hd = arch.hidden_size, arch.head_dim
        self.local_heads = arch.heads // tp.size
        self.local_kv = arch.kv_heads // tp.size
        out_std = INIT_STD / math.sqrt(2 * arch.layers)
        bias = linear_bias(arch)
        n = f"layers.{index}"

        def lin(name: str, i: int, o: int, mode: str, b: bool, std: float = INIT_STD) -> ParallelLinear:  # noqa: PLR0917
            return ParallelLinear(f"{n}.{name}", i, o, mode=mode, bias=b, std=std, seed=seed, tp=tp)

        self.norm1 = Norm(h, arch.norm)
        self.q = lin("q", h, arch.heads * hd, "column", arch.qkv_bias or bias)
        self.k = lin("k", h, arch.kv_heads * hd, "column", arch.qkv_bias or bias)
        self.v = lin("v", h, arch.kv_heads * hd, "column", arch.qkv_bias or bias)
        self.o = lin("o", arch.heads * hd, h, "row", bias, out_std)
        self.norm2 = Norm(h, arch.norm)
        if arch.mlp == "swiglu":
            self.gate: ParallelLinear | None = lin("gate", h, arch.ffn_hidden_size, "column", bias)
        else:
            self.gate = None
        self.up = lin("up", h, arch.ffn_hidden_size, "column", bias)
        self.down = lin("down", arch.ffn_hidden_size, h, "row", bias, out_std)
        self.drop = arch.dropout

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, DROPOUT_P, self.training) if self.drop else x

    def _attention_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # GQA inside the kernel (each kv head serves heads/kv_heads query heads): k and v are kept
        # at kv-head width for backward, not expanded to every head.
        p = DROPOUT_P if (self.drop and self.training) else 0.0
        gqa = self.local_kv != self.local_heads
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, enable_gqa=gqa)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        hd = self.arch.head_dim
        q = self.q(x).view(b, s, self.local_heads, hd).transpose(1, 2)
        k = self.k(x).view(b, s, self.local_kv, hd).transpose(1, 2)
        v = self.v(x).view(b, s, self.local_kv, hd).transpose(1, 2)
        if self.arch.position_embedding == "rope":
            q, k = _rope(q), _rope(k)
        if self.checkpointing == "selective" and self.training:
            out = checkpoint(self._attention_core, q, k, v, use_reentrant=False)
        else:
            out = self._attention_core(q, k, v)
        projected: torch.Tensor = self.o(out.transpose(1, 2).reshape(b, s, self.local_heads * hd))
        return projected

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.gate(x)) * self.up(x) if self.gate is not None else F.gelu(self.up(x))
        out: torch.Tensor = self.down(hidden)
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._dropout(self._attention(self.norm1(x)))
        return x + self._dropout(self._mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing == "full" and self.training:
            out: torch.Tensor = checkpoint(self._forward, x, use_reentrant=False)
            return out
        return self._forward(x)


class Embed(nn.Module):
    """Vocab-parallel token embedding (+ learned positions); token ids -> hidden states."""

    def __init__(self, arch: Architecture, tp: TPContext, seed: int, with_positions: bool = True) -> None:
        super().__init__()
        self.arch, self.tp = arch, tp
        self.vocab_local = arch.vocab_size // tp.size
        self.vocab_start = tp.rank * self.vocab_local
        self.weight = shard_param(
            "embed.weight", (arch.vocab_size, arch.hidden_size), std=INIT_STD, seed=seed, tp=tp, split_dim=0
        )
        if arch.position_embedding == "learned" and with_positions:
            self.pos: nn.Parameter | None = shard_param(
                "embed.pos", (arch.max_sequence_length, arch.hidden_size), std=INIT_STD, seed=seed, tp=tp,
                split_dim=None,
            )  # fmt: skip
        else:
            self.pos = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            x = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_start + self.vocab_local)
            local = (ids - self.vocab_start).masked_fill(outside, 0)
            x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
            x = reduce_from_tp(x, self.tp)
        if self.pos is not None:
            x = x + self.pos[: ids.shape[1]]
        return F.dropout(x, DROPOUT_P, self.training) if self.arch.dropout else x


class FinalNorm(Norm):
    """The norm before the LM head (its own layer so the head can be the tied embedding)."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__(arch.hidden_size, arch.norm)


class Head(nn.Module):
    """Untied vocab-parallel LM head: hidden -> this rank's logits shard."""

    def __init__(self, arch: Architecture, tp: TPContext, seed: int) -> None:
        super().__init__()
        self.tp = tp
        self.weight = shard_param(
            "head.weight", (arch.vocab_size, arch.hidden_size), std=INIT_STD, seed=seed, tp=tp, split_dim=0
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.tp), self.weight)


def tied_head_forward(embed: Embed, x: torch.Tensor) -> torch.Tensor:
    """The LM head of a tied model: logits = x @ embedding shardᵀ."""
    return F.linear(copy_to_tp(x, embed.tp), embed.weight)


class LossFn:
    """``loss_fn(logits, labels)`` for DeepSpeed's PipelineModule and SequentialLM."""

    def __init__(self, tp: TPContext) -> None:
        self.tp = tp

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, labels, self.tp)


class SequentialLM(nn.Module):
    """The whole model on one pipeline stage: ``forward(ids, labels) -> mean loss``."""

    def __init__(self, arch: Architecture, tp: TPContext, seed: int, checkpointing: str) -> None:
        super().__init__()
        self.embed = Embed(arch, tp, seed)
        self.layers = nn.ModuleList(Block(arch, i, tp, seed, checkpointing) for i in range(arch.layers))
        self.norm = FinalNorm(arch)
        self.head = None if arch.tied_embeddings else Head(arch, tp, seed)
        self.loss_fn = LossFn(tp)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        logits = tied_head_forward(self.embed, x) if self.head is None else self.head(x)
        return self.loss_fn(logits, labels)


def pipeline_module(
    arch: Architecture,
    tp: TPContext,
    *,
    seed: int,
    checkpointing: str,
    stage_layers: tuple[tuple[int, int], ...],
    topology: Any,
) -> nn.Module:
    """A DeepSpeed ``PipelineModule`` whose stages hold exactly ``stage_layers`` (the layout's)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec  # noqa: PLC0415 - pp > 1 only

    specs: list[Any] = []
    if arch.tied_embeddings:
        specs.append(TiedLayerSpec("embed", Embed, arch, tp, seed, tied_weight_attr=["weight"]))
    else:
        specs.append(LayerSpec(Embed, arch, tp, seed))
    specs += [LayerSpec(Block, arch, i, tp, seed, checkpointing) for i in range(arch.layers)]
    specs.append(LayerSpec(FinalNorm, arch))
    if arch.tied_embeddings:
        specs.append(
            # The last stage's copy of the tied embedding: the matrix only, no position table.
            TiedLayerSpec(
                "embed",
                Embed,
                arch,
                tp,
                seed,
                False,
                forward_fn=tied_head_forward,
                tied_weight_attr=["weight"],
            )
        )
    else:
        specs.append(LayerSpec(Head, arch, tp, seed))
    # Spec index = layer + 1 (the embedding is spec 0); the last stage also gets norm + head.
    parts = [0] + [stop + 1 for _, stop in stage_layers[:-1]] + [len(specs)]

    class _LayoutPipelineModule(PipelineModule):  # type: ignore[misc]
        def _partition_layers(self, method: str = "uniform") -> None:
            self.parts = parts
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=parts[stage], stop=parts[stage + 1])

    module: nn.Module = _LayoutPipelineModule(
        layers=specs, topology=topology, loss_fn=LossFn(tp), partition_method="uniform"
    )
    return module


@dataclass(frozen=True)
class PipelineNames:
    """Parameter names of :func:`pipeline_module` (``{spec index}.{rest}``, the tied embedding
    ``tied_modules.embed.{rest}``) and of :class:`SequentialLM` (``embed.``, ``layers.N.``,
    ``norm.``, ``head.``), both ways: a checkpoint converts between pipeline depths through the
    plain names, which no partition changes (the spec index is global, not per stage)."""

    layers: int
    tied: bool

    def plain(self, name: str) -> str:
        first, _, rest = name.partition(".")
        if first == "tied_modules":
            return "embed." + rest.partition(".")[2]
        if not first.isdigit():
            return name  # already plain
        index = int(first)
        if index == 0:
            return f"embed.{rest}"
        if index <= self.layers:
            return f"layers.{index - 1}.{rest}"
        return f"{'norm' if index == self.layers + 1 else 'head'}.{rest}"

    def of_layer_file(self, index: int, key: str) -> str:
        """The plain name of entry ``key`` of the pipeline's ``layer_{index}`` checkpoint file."""
        if self.tied and index == self.layers + 2:
            return f"embed.{key}"  # the last stage's copy of the tied embedding
        return self.plain(f"{index}.{key}")

    def pipeline(self, name: str) -> str:
        first, _, rest = name.partition(".")
        if first == "embed":
            return f"tied_modules.embed.{rest}" if self.tied else f"0.{rest}"
        if first == "layers":
            index, _, tail = rest.partition(".")
            return f"{int(index) + 1}.{tail}"
        if first == "norm":
            return f"{self.layers + 1}.{rest}"
        if first == "head":
            return f"{self.layers + 2}.{rest}"
        return name


def count_parameters(arch: Architecture) -> int:
    """Total parameters of the FULL (unsharded) model this file builds, embeddings counted once."""
    h, hd = arch.hidden_size, arch.head_dim
    bias = linear_bias(arch)
    norm = h * (2 if arch.norm == "layernorm" else 1)
    qkv_out = (arch.heads + 2 * arch.kv_heads) * hd
    attn = h * qkv_out + arch.heads * hd * h
    attn += qkv_out if (arch.qkv_bias or bias) else 0
    attn += h if bias else 0
    n_in = 2 if arch.mlp == "swiglu" else 1
    mlp = n_in * h * arch.ffn_hidden_size + arch.ffn_hidden_size * h
    mlp += (n_in * arch.ffn_hidden_size + h) if bias else 0
    block = attn + mlp + 2 * norm
    emb = arch.vocab_size * h * (1 if arch.tied_embeddings else 2)
    pos = arch.max_sequence_length * h if arch.position_embedding == "learned" else 0
    return arch.layers * block + emb + pos + norm
