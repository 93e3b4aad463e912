"""Architecture from a Hugging Face config.json: Qwen2-VL, ChatGLM, GPT-2; other decoders: decoder_configs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shardwise.planner.architecture import Architecture
from shardwise.planner.decoder_configs import parse_decoder
from shardwise.planner.errors import PlanInputError
from shardwise.planner.presets import QWEN2_VL_72B_VISION_PARAMS


def _int(config: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = config.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise PlanInputError(f"config.json {key}: expected an integer, got {value!r}")
            return value
    if default is None:
        raise PlanInputError(f"config.json: missing {' / '.join(keys)}")
    return default


def vision_tower_params(vision: Mapping[str, Any], lm_hidden: int) -> int:
    """Qwen2-VL vision tower parameters, counted module by module (see presets.py)."""
    d = _int(vision, "embed_dim", default=1280)
    depth = _int(vision, "depth", default=32)
    ratio = vision.get("mlp_ratio", 4)
    f = int(d * ratio)
    patch = _int(vision, "patch_size", "spatial_patch_size", default=14)
    temporal = _int(vision, "temporal_patch_size", default=2)
    channels = _int(vision, "in_chans", "in_channels", default=3)
    merge = _int(vision, "spatial_merge_size", default=2)
    out = _int(vision, "hidden_size", default=lm_hidden)
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    merged = d * merge * merge
    merger = 2 * d + (merged * merged + merged) + (merged * out + out)
    return channels * temporal * patch * patch * d + depth * block + merger


def parse_hf_config(config: Mapping[str, Any], notes: list[str] | None = None) -> Architecture:
    """Map a config.json dict to an Architecture; PlanInputError names what is missing. Notes
    (an unknown model_type read by the common keys) are appended to `notes` when given."""
    model_type = str(config.get("model_type", "")).lower()
    if model_type == "qwen2_vl":
        outer = config
        nested = config.get("text_config")
        if isinstance(nested, Mapping) and nested.get("hidden_size") is not None:
            config = nested  # transformers >= 5 nests a Qwen2-VL's language model config
        h = _int(config, "hidden_size")
        heads = _int(config, "num_attention_heads")
        extra = 0
        if model_type == "qwen2_vl":
            vision = outer.get("vision_config")
            extra = (
                vision_tower_params(vision, h) if isinstance(vision, Mapping) else QWEN2_VL_72B_VISION_PARAMS
            )
        return Architecture(
            # layout.json families: a Qwen2-VL is a qwen2 language model + extra_parameters.
            family="qwen2" if model_type == "qwen2_vl" else model_type,
            layers=_int(config, "num_hidden_layers"),
            hidden_size=h,
            heads=heads,
            kv_heads=_int(config, "num_key_value_heads", default=heads),
            ffn_hidden_size=_int(config, "intermediate_size"),
            vocab_size=_int(config, "vocab_size"),
            mlp="swiglu",
            norm="rmsnorm",
            tied_embeddings=bool(outer.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
            max_sequence_length=_int(config, "max_position_embeddings", default=4096),
            qkv_bias=model_type.startswith("qwen2") or bool(config.get("attention_bias", False)),
            extra_parameters=extra,
        )
    if model_type == "chatglm":
        heads = _int(config, "num_attention_heads")
        groups = _int(config, "multi_query_group_num", default=heads)
        return Architecture(
            family="chatglm",
            layers=_int(config, "num_layers"),
            hidden_size=_int(config, "hidden_size"),
            heads=heads,
            kv_heads=groups if config.get("multi_query_attention", False) else heads,
            ffn_hidden_size=_int(config, "ffn_hidden_size"),
            vocab_size=_int(config, "padded_vocab_size", "vocab_size"),
            mlp="swiglu",
            norm="rmsnorm" if config.get("rmsnorm", True) else "layernorm",
            tied_embeddings=False,
            max_sequence_length=_int(config, "seq_length", default=8192),
            qkv_bias=bool(config.get("add_qkv_bias", False)),
        )
    if model_type == "gpt2":
        h = _int(config, "n_embd", "hidden_size")
        return Architecture(
            family="gpt",
            layers=_int(config, "n_layer", "num_hidden_layers"),
            hidden_size=h,
            heads=_int(config, "n_head", "num_attention_heads"),
            ffn_hidden_size=_int(config, "n_inner", default=4 * h),
            vocab_size=_int(config, "vocab_size"),
            mlp="gelu",
            norm="layernorm",
            tied_embeddings=bool(config.get("tie_word_embeddings", True)),
            dropout=True,
            position_embedding="learned",
            max_sequence_length=_int(config, "n_positions", "n_ctx", default=1024),
        )
    if not model_type:
        raise PlanInputError("config.json: missing model_type")
    return parse_decoder(config, model_type, notes)
