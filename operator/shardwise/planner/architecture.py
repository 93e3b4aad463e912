"""Model shapes (Architecture, ModelSpec) and exact parameter counts per layer, stage and model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shardwise.planner.errors import PlanInputError

Mlp = Literal["gelu", "swiglu"]
Norm = Literal["rmsnorm", "layernorm"]
PositionEmbedding = Literal["rope", "learned"]
MLPS: tuple[Mlp, ...] = ("gelu", "swiglu")
NORMS: tuple[Norm, ...] = ("rmsnorm", "layernorm")
POSITIONS: tuple[PositionEmbedding, ...] = ("rope", "learned")
FAMILIES = ("llama", "gpt", "qwen2", "chatglm", "mistral", "custom")  # layout.json "family"


@dataclass(frozen=True, slots=True)
class Architecture:
    """A decoder-only transformer shape; field names follow layout.json "architecture".

    Bias convention (no extra contract field): LayerNorm blocks (GPT-2 / Megatron GPT) carry a
    bias on every linear layer and norm; RMSNorm blocks (Llama, Qwen2, ChatGLM) carry biases only
    on the Q/K/V projections when `qkv_bias` is set.
    """

    layers: int
    hidden_size: int
    heads: int
    vocab_size: int
    kv_heads: int = 0  # 0 = same as heads (multi-head attention)
    ffn_hidden_size: int = 0  # 0 = 4h for gelu, the Llama rule for swiglu
    mlp: Mlp = "swiglu"
    norm: Norm = "rmsnorm"
    tied_embeddings: bool = False
    dropout: bool = False
    position_embedding: PositionEmbedding = "rope"
    max_sequence_length: int = 4096
    qkv_bias: bool = False
    extra_parameters: int = 0
    family: str = "custom"

    def __post_init__(self) -> None:
        for name in ("layers", "hidden_size", "heads", "vocab_size", "max_sequence_length"):
            if getattr(self, name) <= 0:
                raise PlanInputError(f"architecture {name} must be positive, got {getattr(self, name)}")
        if self.kv_heads < 0 or self.ffn_hidden_size < 0 or self.extra_parameters < 0:
            raise PlanInputError("architecture kvHeads, ffnHiddenSize and extraParameters must be >= 0")
        if self.kv_heads == 0:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.ffn_hidden_size == 0:
            object.__setattr__(self, "ffn_hidden_size", default_ffn(self.hidden_size, self.mlp))
        if self.hidden_size % self.heads:
            raise PlanInputError(
                f"architecture heads={self.heads} does not divide hiddenSize={self.hidden_size}"
            )
        if self.heads % self.kv_heads:
            raise PlanInputError(f"architecture kvHeads={self.kv_heads} does not divide heads={self.heads}")
        if self.family not in FAMILIES:
            raise PlanInputError(
                f"architecture family must be one of {', '.join(FAMILIES)}, got {self.family!r}"
            )
        if self.mlp not in MLPS:
            raise PlanInputError(f"architecture mlp must be gelu or swiglu, got {self.mlp!r}")
        if self.norm not in NORMS:
            raise PlanInputError(f"architecture norm must be rmsnorm or layernorm, got {self.norm!r}")
        if self.position_embedding not in POSITIONS:
            raise PlanInputError(
                f"architecture positionEmbedding must be rope or learned, got {self.position_embedding!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    @property
    def linear_bias(self) -> bool:
        """Biases on every linear layer (GPT-2 / Megatron GPT convention, see class docstring)."""
        return self.norm == "layernorm"

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    # --- parameter counts -------------------------------------------------------------------
    @property
    def attention_linear_params(self) -> int:
        """Q, K, V and output projection weights (+ biases); all TP-sharded (Megatron)."""
        h, kv = self.hidden_size, self.kv_dim
        weights = h * h + 2 * h * kv + h * h
        if self.linear_bias:
            return weights + h + 2 * kv + h
        return weights + (h + 2 * kv if self.qkv_bias else 0)

    @property
    def mlp_params(self) -> int:
        h, f = self.hidden_size, self.ffn_hidden_size
        if self.mlp == "swiglu":  # gate, up (h x f) and down (f x h)
            return 3 * h * f + (2 * f + h if self.linear_bias else 0)
        return 2 * h * f + (f + h if self.linear_bias else 0)

    @property
    def norm_params(self) -> int:
        """One norm: LayerNorm has weight + bias, RMSNorm weight only; replicated under TP."""
        return 2 * self.hidden_size if self.norm == "layernorm" else self.hidden_size

    @property
    def layer_params(self) -> int:
        """One transformer layer: attention + MLP + two norms (GPT: 12h^2 + 13h, Narayanan eq. 2)."""
        return self.attention_linear_params + self.mlp_params + 2 * self.norm_params

    @property
    def layer_matmul_weights(self) -> int:
        """Weights that take part in matmuls (FLOP counting: 2 FLOPs per weight per token)."""
        h, f, kv = self.hidden_size, self.ffn_hidden_size, self.kv_dim
        return 2 * h * h + 2 * h * kv + (3 if self.mlp == "swiglu" else 2) * h * f

    @property
    def embedding_params(self) -> int:
        """Token embedding, plus learned positions (max_sequence_length x h) when used."""
        pos = self.max_sequence_length * self.hidden_size if self.position_embedding == "learned" else 0
        return self.vocab_size * self.hidden_size + pos

    @property
    def output_params(self) -> int:
        """Final norm + output (LM head) layer; the head is counted once when tied."""
        head = 0 if self.tied_embeddings else self.vocab_size * self.hidden_size
        return self.norm_params + head

    @property
    def total_params(self) -> int:
        """Whole model, tied embeddings counted once, extra parameters (vision tower) included."""
        return (
            self.layers * self.layer_params
            + self.embedding_params
            + self.output_params
            + self.extra_parameters
        )

    def largest_layer_params(self) -> int:
        """Largest single module ZeRO-3 gathers at once (DeepSpeed's `largest_layer_params`)."""
        return max(self.layer_params, self.vocab_size * self.hidden_size)

    def to_dict(self) -> dict[str, object]:
        """The layout.json "architecture" object (docs/layout-contract.md)."""
        return {
            "family": self.family,
            "layers": self.layers,
            "hidden_size": self.hidden_size,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "ffn_hidden_size": self.ffn_hidden_size,
            "vocab_size": self.vocab_size,
            "mlp": self.mlp,
            "norm": self.norm,
            "tied_embeddings": self.tied_embeddings,
            "dropout": self.dropout,
            "position_embedding": self.position_embedding,
            "max_sequence_length": self.max_sequence_length,
            "qkv_bias": self.qkv_bias,
            "extra_parameters": self.extra_parameters,
        }


def default_ffn(hidden: int, mlp: Mlp) -> int:
    """4h for GeLU; for SwiGLU the Llama rule: 2/3 of 4h rounded up to a multiple of 256."""
    if mlp == "gelu":
        return 4 * hidden
    return 256 * -(-(8 * hidden // 3) // 256)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What is being trained: a named architecture, or a bare parameter count (architecture None)."""

    name: str
    architecture: Architecture | None = None
    parameter_count: int = 0  # used only when architecture is None

    def __post_init__(self) -> None:
        if self.architecture is None and self.parameter_count <= 0:
            raise PlanInputError(f"model {self.name!r}: need an architecture or a positive parameter count")

    @property
    def parameters(self) -> int:
        if self.architecture is not None:
            return self.architecture.total_params
        return self.parameter_count


def split_layers(layers: int, pp: int) -> tuple[tuple[int, int], ...]:
    """[first, last) layers of each pipeline stage, sizes differing by at most one.

    Non-divisible counts: the r = layers % pp extra layers go to the *last* r stages. In 1F1B,
    stage i keeps (pp - i) micro-batches in flight (Korthikanti 2022, eq. 5), so a layer placed
    late costs the least activation memory; the first stage also holds the embedding (and any
    vision tower).
    """
    base, extra = divmod(layers, pp)
    bounds: list[tuple[int, int]] = []
    start = 0
    for stage in range(pp):
        n = base + (1 if stage >= pp - extra else 0)
        bounds.append((start, start + n))
        start += n
    return tuple(bounds)
