"""The planner's parameter counts equal those of the model transformers builds from the same config.json.

Each config holds the published values of a model's config.json (written here, nothing is
downloaded); transformers builds the model on the meta device (no memory, no weights) and its
parameters are counted. The planner reads the same dict with its pure parser.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from shardwise.planner import PRESETS, parse_hf_config
from shardwise.planner.hf_presets import HF_CONFIGS

_NEMO = dict(hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128, vocab_size=131072, tie_word_embeddings=False)  # fmt: skip

# name -> (config.json values, published total parameters in billions, published active billions)
CONFIGS: dict[str, tuple[dict[str, Any], float, float | None]] = {
    "llama-3.1-8b": (dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                          tie_word_embeddings=False), 8.03, None),
    "mistral-nemo-12b": (dict(model_type="mistral", **_NEMO), 12.25, None),
    "qwen2-7b": (dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                      tie_word_embeddings=False), 7.62, None),
    "qwen3-0.6b": (dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                        tie_word_embeddings=True), 0.60, None),
    "qwen3-8b": (dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                      tie_word_embeddings=False), 8.19, None),
    "gemma-7b": (dict(model_type="gemma", hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=16, head_dim=256, vocab_size=256000),
                 8.54, None),
    "gemma-2-9b": (dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                        sliding_window=4096), 9.24, None),
    "gemma-3-1b": (dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912,
                        num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        vocab_size=262144, sliding_window=512), 1.00, None),
    "phi-3-mini": (dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                        tie_word_embeddings=False, pad_token_id=32000), 3.82, None),
    "glm-4-9b-chat-hf": (dict(model_type="glm", hidden_size=4096, intermediate_size=13696,
                              num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
                              head_dim=128, vocab_size=151552, attention_bias=True, pad_token_id=151329,
                              tie_word_embeddings=False), 9.40, None),
    "glm-4-9b-0414": (dict(model_type="glm4", hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                           num_attention_heads=32, num_key_value_heads=2, head_dim=128, vocab_size=151552,
                           attention_bias=True, pad_token_id=151329, tie_word_embeddings=False), 9.40, None),
    "mixtral-8x7b": (dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                          vocab_size=32000, num_local_experts=8,
                          num_experts_per_tok=2, tie_word_embeddings=False), 46.7, 12.9),
    "qwen3-30b-a3b": (dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                           moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                           num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128,
                           num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                           tie_word_embeddings=False), 30.5, 3.3),
    "qwen1.5-moe-a2.7b": (dict(model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632,
                               moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                               num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                               vocab_size=151936, num_experts=60, num_experts_per_tok=4,
                               tie_word_embeddings=False), 14.3, 2.7),
    "deepseek-v2-lite": (dict(model_type="deepseek_v2", hidden_size=2048, intermediate_size=10944,
                              moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                              num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2,
                              num_experts_per_tok=6, first_k_dense_replace=1, q_lora_rank=None,
                              kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                              vocab_size=102400, n_group=1, topk_group=1, tie_word_embeddings=False),
                         15.7, 2.4),
    "deepseek-v3": (dict(model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432,
                         moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                         num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1,
                         num_experts_per_tok=8, first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512,
                         qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, vocab_size=129280,
                         n_group=8, topk_group=4, tie_word_embeddings=False), 671.0, 37.0),
}  # fmt: skip


def _transformers_count(config: dict[str, Any]) -> int:
    values = {k: v for k, v in config.items() if k != "model_type"}
    cfg = AutoConfig.for_model(config["model_type"], **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_count_equals_transformers(name: str) -> None:
    config, published, active = CONFIGS[name]
    arch = parse_hf_config(config)
    assert arch.total_params == _transformers_count(config)
    # The published figure (model card, rounded) is what users compare with.
    assert arch.total_params / 1e9 == pytest.approx(published, rel=0.02)
    if active is not None:
        assert arch.moe
        # Publishers differ on counting the embedding among the "activated" parameters.
        assert arch.active_params / 1e9 == pytest.approx(active, rel=0.12)


def test_full_config_dict_reads_the_same() -> None:
    """A config.json as save_pretrained writes it (every key) gives the same shape."""
    config, _, _ = CONFIGS["qwen3-30b-a3b"]
    values = {k: v for k, v in config.items() if k != "model_type"}
    full = AutoConfig.for_model("qwen3_moe", **values).to_dict()
    assert parse_hf_config(full).total_params == parse_hf_config(config).total_params


def test_coverage() -> None:
    assert len(CONFIGS) >= 12
    assert sum(1 for c, _, a in CONFIGS.values() if a is not None) >= 3


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_presets_equal_transformers(name: str) -> None:
    """`shardwise presets` shapes: the planner's count is the count of the model transformers builds."""
    assert PRESETS[name].architecture.total_params == _transformers_count(HF_CONFIGS[name])
