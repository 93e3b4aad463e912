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
    # --- shapes beyond the Llama block (all default to "absent"; hf_config / decoder_configs set
    # them from a config.json). An explicit head_dim (Mistral-NeMo, Gemma, Qwen3) may differ from
    # hidden / heads, so Q and the output projection are heads x head_dim wide.
    head_dim_explicit: int = 0
    output_bias: bool = False  # a bias on the attention output projection (Llama attention_bias)
    sliding_window: int = 0  # tokens a sliding-window layer attends to (0 = full attention)
    sliding_window_layers: int = 0  # how many layers use it (Gemma2/3 alternate)
    qk_norm: bool = False  # per-head RMSNorm on Q and K (Qwen3, Gemma3): 2 x head_dim weights
    norms_per_layer: int = 2  # Gemma2/3 and GLM-4 add post-attention / post-MLP norms: 4
    # Mixture of experts: `experts` routed experts of `expert_ffn_hidden_size` each, top-k active,
    # shared experts (one MLP of their summed width), `dense_layers` leading dense layers.
    experts: int = 0
    experts_per_token: int = 0
    expert_ffn_hidden_size: int = 0
    shared_expert_ffn_hidden_size: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE: a sigmoid gate h -> 1 on the shared expert
    dense_layers: int = 0
    # Multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank 0 = ordinary attention.
    q_lora_rank: int = 0  # 0 = a full-rank Q projection
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

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
        if not self.head_dim_explicit and not self.mla and self.hidden_size % self.heads:
            raise PlanInputError(
                f"architecture heads={self.heads} does not divide hiddenSize={self.hidden_size}"
            )
        if self.heads % self.kv_heads:
            raise PlanInputError(f"architecture kvHeads={self.kv_heads} does not divide heads={self.heads}")
        self._check_moe()
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

    def _check_moe(self) -> None:
        if self.experts < 0 or self.dense_layers < 0 or self.experts_per_token < 0:
            raise PlanInputError("architecture experts, expertsPerToken and denseLayers must be >= 0")
        if self.experts:
            if not 1 <= self.experts_per_token <= self.experts:
                raise PlanInputError(
                    f"architecture expertsPerToken={self.experts_per_token} must be 1..experts={self.experts}"
                )
            if self.expert_ffn_hidden_size <= 0:
                raise PlanInputError("architecture with experts needs a positive expertFfnHiddenSize")
            if self.dense_layers >= self.layers:
                raise PlanInputError(
                    f"architecture denseLayers={self.dense_layers} leaves no MoE layer of {self.layers}"
                )

    @property
    def head_dim(self) -> int:
        return self.head_dim_explicit or self.hidden_size // self.heads

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.moe else 0

    @property
    def q_dim(self) -> int:
        """Width of Q (and of the attention output): heads x head_dim."""
        if self.mla:
            return self.heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        return self.heads * self.head_dim

    @property
    def attention_value_dim(self) -> int:
        return self.heads * self.v_head_dim if self.mla else self.q_dim

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
        h, kv, q = self.hidden_size, self.kv_dim, self.q_dim
        if self.mla:
            # DeepSeek MLA: Q down (+ norm) and up projections, joint KV down projection with the
            # shared rope key (+ norm), KV up projection to nope keys and values, output.
            r, ql, kvl = self.qk_rope_head_dim, self.q_lora_rank, self.kv_lora_rank
            q_proj = h * ql + ql + ql * q if ql else h * q
            kv_proj = h * (kvl + r) + kvl + kvl * self.heads * (self.qk_nope_head_dim + self.v_head_dim)
            return q_proj + kv_proj + self.attention_value_dim * h
        weights = h * q + 2 * h * kv + q * h
        norms = 2 * self.head_dim if self.qk_norm else 0
        if self.linear_bias:
            return weights + q + 2 * kv + h + norms
        return weights + (q + 2 * kv if self.qkv_bias else 0) + (h if self.output_bias else 0) + norms

    def mlp_params_of(self, f: int) -> int:
        """One MLP of width f: gate, up (h x f) and down (f x h) for SwiGLU (+ biases)."""
        h = self.hidden_size
        if f == 0:
            return 0
        if self.mlp == "swiglu":
            return 3 * h * f + (2 * f + h if self.linear_bias else 0)
        return 2 * h * f + (f + h if self.linear_bias else 0)

    @property
    def mlp_params(self) -> int:
        return self.mlp_params_of(self.ffn_hidden_size)

    @property
    def expert_params_per_layer(self) -> int:
        """Routed experts of one MoE layer: the parameters expert parallelism shards."""
        return self.experts * self.mlp_params_of(self.expert_ffn_hidden_size)

    @property
    def router_params(self) -> int:
        """Router (h x experts) and the shared-expert gate of one MoE layer."""
        return self.hidden_size * self.experts + (self.hidden_size if self.shared_expert_gate else 0)

    @property
    def norm_params(self) -> int:
        """One norm: LayerNorm has weight + bias, RMSNorm weight only; replicated under TP."""
        return 2 * self.hidden_size if self.norm == "layernorm" else self.hidden_size

    @property
    def dense_layer_params(self) -> int:
        """One dense layer: attention + MLP + norms (GPT: 12h^2 + 13h, Narayanan eq. 2)."""
        return self.attention_linear_params + self.mlp_params + self.norms_per_layer * self.norm_params

    @property
    def moe_layer_params(self) -> int:
        """One MoE layer: attention, routed + shared experts, router, norms."""
        return (
            self.attention_linear_params
            + self.expert_params_per_layer
            + self.mlp_params_of(self.shared_expert_ffn_hidden_size)
            + self.router_params
            + self.norms_per_layer * self.norm_params
        )

    @property
    def layer_params(self) -> int:
        """The typical layer: the MoE layer of a mixture-of-experts model, else the dense one."""
        return self.moe_layer_params if self.moe else self.dense_layer_params

    def is_dense_layer(self, index: int) -> bool:
        return not self.moe or index < self.dense_layers

    def layers_in(self, first: int, last: int) -> tuple[int, int]:
        """(dense, MoE) layer counts in [first, last)."""
        if not self.moe:
            return last - first, 0
        dense = max(0, min(last, self.dense_layers) - first)
        return dense, last - first - dense

    def _matmul_weights(self, f: int) -> int:
        h = self.hidden_size
        mlp = (3 if self.mlp == "swiglu" else 2) * h * f
        if self.mla:
            return self.attention_linear_params + mlp  # its norms are negligible here
        return 2 * h * self.q_dim + 2 * h * self.kv_dim + mlp

    @property
    def layer_matmul_weights(self) -> int:
        """Matmul weights a token meets in a typical layer (2 FLOPs per weight per token): for MoE
        the top-k routed experts, the shared experts and the router, not every expert."""
        if not self.moe:
            return self._matmul_weights(self.ffn_hidden_size)
        active = self.experts_per_token * self.expert_ffn_hidden_size + self.shared_expert_ffn_hidden_size
        return self._matmul_weights(active) + self.hidden_size * self.experts

    @property
    def dense_matmul_weights(self) -> int:
        return self._matmul_weights(self.ffn_hidden_size)

    @property
    def matmul_weights_all_layers(self) -> int:
        """Active matmul weights per token summed over every layer (dense and MoE)."""
        if not self.moe:
            return self.layers * self.layer_matmul_weights
        return self.dense_layers * self.dense_matmul_weights + self.moe_layers * self.layer_matmul_weights

    @property
    def active_params(self) -> int:
        """Parameters one token uses (top-k experts): the usual "active parameters" of an MoE."""
        if not self.moe:
            return self.total_params
        idle = self.moe_layers * (self.experts - self.experts_per_token)
        return self.total_params - idle * self.mlp_params_of(self.expert_ffn_hidden_size)

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
        dense, moe = self.layers_in(0, self.layers)
        return (
            dense * self.dense_layer_params
            + moe * self.moe_layer_params
            + self.embedding_params
            + self.output_params
            + self.extra_parameters
        )

    def largest_layer_params(self) -> int:
        """Largest single module ZeRO-3 gathers at once (DeepSpeed's `largest_layer_params`)."""
        return max(self.layer_params, self.dense_layer_params, self.vocab_size * self.hidden_size)

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
            **{k: v for k, v in self._shape_extras().items() if v != _EXTRA_DEFAULTS[k]},
        }

    def _shape_extras(self) -> dict[str, object]:
        return {
            "head_dim": self.head_dim_explicit,
            "output_bias": self.output_bias,
            "sliding_window": self.sliding_window,
            "sliding_window_layers": self.sliding_window_layers,
            "qk_norm": self.qk_norm,
            "norms_per_layer": self.norms_per_layer,
            "experts": self.experts,
            "experts_per_token": self.experts_per_token,
            "expert_ffn_hidden_size": self.expert_ffn_hidden_size,
            "shared_expert_ffn_hidden_size": self.shared_expert_ffn_hidden_size,
            "shared_expert_gate": self.shared_expert_gate,
            "dense_layers": self.dense_layers,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "v_head_dim": self.v_head_dim,
        }


# layout.json carries the shape extras only when set, so dense Llama-style documents are unchanged.
_EXTRA_DEFAULTS: dict[str, object] = {
    "head_dim": 0,
    "output_bias": False,
    "sliding_window": 0,
    "sliding_window_layers": 0,
    "qk_norm": False,
    "norms_per_layer": 2,
    "experts": 0,
    "experts_per_token": 0,
    "expert_ffn_hidden_size": 0,
    "shared_expert_ffn_hidden_size": 0,
    "shared_expert_gate": False,
    "dense_layers": 0,
    "q_lora_rank": 0,
    "kv_lora_rank": 0,
    "qk_rope_head_dim": 0,
    "qk_nope_head_dim": 0,
    "v_head_dim": 0,
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
    notes: tuple[str, ...] = ()  # how the shape was read (an unknown config.json model_type)

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
