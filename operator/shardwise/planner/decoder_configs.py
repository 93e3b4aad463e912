"""Architecture of any decoder-only Hugging Face config.json: common keys, MoE, MLA, per-type rules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shardwise.planner.architecture import Architecture
from shardwise.planner.errors import PlanInputError

# model_types whose modules were checked against the model transformers builds
# (tests/trainer/test_param_counts.py); any other decoder is read by the same common keys, with a note.
KNOWN_TYPES = (
    "llama", "mistral", "granite", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "mixtral",
    "gemma", "gemma2", "gemma3_text", "phi3", "glm", "glm4", "deepseek_v2", "deepseek_v3",
)  # fmt: skip
_FAMILY = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
# Class defaults transformers applies when a config.json leaves the key out.
_TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3_text")
_QKV_BIAS_ALWAYS = ("qwen2", "qwen2_moe")  # their Q/K/V projections always carry a bias
_ATTENTION_BIAS_DEFAULT_ON = ("glm", "glm4")
_ATTENTION_BIAS_ON_OUTPUT = ("llama", "mistral", "granite", "qwen3", "qwen3_moe", "gemma", "gemma2",
                             "gemma3_text", "deepseek_v2", "deepseek_v3")  # fmt: skip
_QK_NORM = ("qwen3", "qwen3_moe", "gemma3_text")
_FOUR_NORMS = ("gemma2", "gemma3_text", "glm4")  # post-attention and post-MLP norms as well
_NOT_DECODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra",
                 "t5", "mt5", "bart", "mbart", "whisper", "vit", "clip")  # fmt: skip


def _int(config: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = config.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise PlanInputError(f"config.json {key}: expected an integer, got {value!r}")
            return value
    if default is None:
        raise PlanInputError(f"config.json: missing {' / '.join(keys)} (needed to plan a decoder)")
    return default


def _bool(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key)
    return default if value is None else bool(value)


def _sliding(config: Mapping[str, Any], layers: int) -> tuple[int, int]:
    """(window, layers using it): layer_types when given (Gemma2/3), else every layer unless the
    config switches it off (Qwen2's use_sliding_window)."""
    window = config.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return 0, 0
    types = config.get("layer_types")
    if isinstance(types, list) and types:
        return window, sum(1 for t in types if t == "sliding_attention")
    if config.get("use_sliding_window") is False:
        return 0, 0
    return window, layers


def _moe_fields(config: Mapping[str, Any], model_type: str, ffn: int) -> dict[str, Any]:
    experts = _int(config, "num_experts", "num_local_experts", "n_routed_experts", default=0)
    if experts == 0:
        return {}
    step = config.get("decoder_sparse_step", 1)
    only_dense = config.get("mlp_only_layers") or []
    if step not in (None, 1) or only_dense:
        key = "decoder_sparse_step" if step not in (None, 1) else "mlp_only_layers"
        raise PlanInputError(
            f"config.json {key}={config.get(key)!r}: MoE layers interleaved with dense ones are not "
            "modelled (only leading dense layers, first_k_dense_replace)"
        )
    expert_ffn = _int(config, "moe_intermediate_size", default=ffn)
    shared = _int(config, "shared_expert_intermediate_size", default=0)
    if not shared:
        shared = _int(config, "n_shared_experts", default=0) * expert_ffn
    return {
        "experts": experts,
        "experts_per_token": _int(config, "num_experts_per_tok", "moe_topk"),
        "expert_ffn_hidden_size": expert_ffn,
        "shared_expert_ffn_hidden_size": shared,
        "shared_expert_gate": model_type == "qwen2_moe" and shared > 0,
        "dense_layers": _int(config, "first_k_dense_replace", default=0),
    }


def _mla_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    if config.get("kv_lora_rank") is None:
        return {}
    return {
        "q_lora_rank": _int(config, "q_lora_rank", default=0),
        "kv_lora_rank": _int(config, "kv_lora_rank"),
        "qk_rope_head_dim": _int(config, "qk_rope_head_dim"),
        "qk_nope_head_dim": _int(config, "qk_nope_head_dim"),
        "v_head_dim": _int(config, "v_head_dim"),
    }


def parse_decoder(config: Mapping[str, Any], model_type: str, notes: list[str] | None = None) -> Architecture:
    """A decoder-only config.json as an Architecture; an unknown model_type is read by the common
    keys and gets a note; a missing key raises PlanInputError naming it."""
    if config.get("is_encoder_decoder") or model_type in _NOT_DECODERS:
        raise PlanInputError(
            f"config.json model_type {model_type!r} is not a decoder-only language model: not supported"
        )
    outer = config
    nested = config.get("text_config")
    if isinstance(nested, Mapping) and nested.get("hidden_size") is not None:
        config = nested  # multimodal configs nest the language model's config
        if notes is not None:
            notes.append(
                f"config.json model_type {model_type!r}: planned from its text_config; the vision "
                "tower's parameters are not counted"
            )
    elif model_type not in KNOWN_TYPES and notes is not None:
        notes.append(
            f"config.json model_type {model_type!r} is not one shardwise has checked against "
            "transformers: planned from the common decoder keys (hidden_size, intermediate_size, "
            "num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, vocab_size)"
        )
    h = _int(config, "hidden_size", "n_embd", "d_model")
    heads = _int(config, "num_attention_heads", "n_head")
    layers = _int(config, "num_hidden_layers", "n_layer", "num_layers")
    moe = _moe_fields(config, model_type, _int(config, "intermediate_size", default=0))
    ffn = _int(config, "intermediate_size", "ffn_hidden_size", "n_inner", default=0 if moe else None)
    mla = _mla_fields(config)
    head_dim = _int(config, "head_dim", default=0)
    if mla or (head_dim == h // heads and h % heads == 0):
        head_dim = 0  # MLA has its own head dims; an explicit head_dim equal to h / heads adds nothing
    attention_bias = _bool(config, "attention_bias", model_type in _ATTENTION_BIAS_DEFAULT_ON)
    window, window_layers = _sliding(config, layers)
    return Architecture(
        family=_FAMILY.get(model_type, "custom"),
        layers=layers,
        hidden_size=h,
        heads=heads,
        kv_heads=_int(config, "num_key_value_heads", default=heads),
        ffn_hidden_size=ffn or moe.get("expert_ffn_hidden_size", 0),
        vocab_size=_int(config, "vocab_size"),
        mlp="swiglu",
        norm="rmsnorm",
        tied_embeddings=_bool(
            outer, "tie_word_embeddings", _bool(config, "tie_word_embeddings", model_type in _TIED_BY_DEFAULT)
        ),
        max_sequence_length=_int(config, "max_position_embeddings", default=4096),
        qkv_bias=(model_type in _QKV_BIAS_ALWAYS or attention_bias) and not mla,
        output_bias=attention_bias and model_type in _ATTENTION_BIAS_ON_OUTPUT and not mla,
        head_dim_explicit=head_dim,
        qk_norm=model_type in _QK_NORM or _bool(config, "use_qk_norm", False),
        norms_per_layer=4 if model_type in _FOUR_NORMS else 2,
        sliding_window=window,
        sliding_window_layers=window_layers,
        **moe,
        **mla,
    )
