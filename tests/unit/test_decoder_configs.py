"""Generic decoder config.json parsing: explicit head_dim, unknown model types, MoE / MLA keys, errors."""

from __future__ import annotations

import pytest

from shardwise.planner import PlanInputError, parse_hf_config

_BASE = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}  # fmt: skip


def test_explicit_head_dim_mistral_nemo_is_12_25b() -> None:
    nemo = {"model_type": "mistral", "hidden_size": 5120, "intermediate_size": 14336,
            "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "vocab_size": 131072, "tie_word_embeddings": False}  # fmt: skip
    arch = parse_hf_config(nemo)
    assert arch.head_dim == 128 and arch.q_dim == 4096
    assert arch.total_params == 12_247_782_400  # transformers' count (tests/trainer/test_param_counts.py)


def test_unknown_model_type_is_planned_from_common_keys_with_a_note() -> None:
    notes: list[str] = []
    known = parse_hf_config({"model_type": "llama", **_BASE})
    other = parse_hf_config({"model_type": "my_new_decoder", **_BASE}, notes)
    assert other.total_params == known.total_params
    assert len(notes) == 1 and "my_new_decoder" in notes[0] and "common decoder keys" in notes[0]
    assert parse_hf_config({"model_type": "llama", **_BASE}, notes) == known and len(notes) == 1


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "my_decoder", **{k: v for k, v in _BASE.items() if k != "vocab_size"}},
         "missing vocab_size"),
        ({"model_type": "mixtral", **_BASE, "num_local_experts": 8}, "missing num_experts_per_tok"),
        ({"model_type": "qwen3_moe", **_BASE, "num_experts": 8, "num_experts_per_tok": 2,
          "decoder_sparse_step": 2}, "decoder_sparse_step=2"),
        ({"model_type": "t5", **_BASE}, "not a decoder-only"),
        ({**_BASE}, "missing model_type"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(config: dict[str, object], message: str) -> None:
    with pytest.raises(PlanInputError, match=message):
        parse_hf_config(config)


def test_moe_counts_active_parameters_by_top_k() -> None:
    arch = parse_hf_config(
        {"model_type": "mixtral", **_BASE, "num_local_experts": 8, "num_experts_per_tok": 2}
    )
    expert = 3 * 4096 * 11008
    assert arch.experts == 8 and arch.expert_params_per_layer == 8 * expert
    assert arch.total_params - arch.active_params == 32 * 6 * expert


def test_sliding_window_layers_follow_layer_types() -> None:
    gemma2 = parse_hf_config({"model_type": "gemma2", **_BASE, "head_dim": 128, "sliding_window": 4096,
                              "layer_types": ["sliding_attention", "full_attention"] * 16})  # fmt: skip
    assert (gemma2.sliding_window, gemma2.sliding_window_layers) == (4096, 16)
    qwen2 = parse_hf_config(
        {"model_type": "qwen2", **_BASE, "sliding_window": 4096, "use_sliding_window": False}
    )
    assert qwen2.sliding_window == 0
