"""config.json values of popular Hugging Face decoders (dense, MoE, MLA), read by decoder_configs."""

from __future__ import annotations

from typing import Any

_QWEN3 = {"model_type": "qwen3", "vocab_size": 151936, "head_dim": 128, "max_position_embeddings": 40960}
_QWEN3_MOE = {**_QWEN3, "model_type": "qwen3_moe", "tie_word_embeddings": False}
_MIXTRAL = {"model_type": "mixtral", "num_experts_per_tok": 2, "tie_word_embeddings": False}
_GEMMA2 = {"model_type": "gemma2", "vocab_size": 256000, "max_position_embeddings": 8192,
           "sliding_window": 4096}  # fmt: skip
_DEEPSEEK_MLA = {"qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "kv_lora_rank": 512,
                 "tie_word_embeddings": False}  # fmt: skip

#: preset name -> config.json values (the keys the planner reads; the rest of each file is omitted).
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "vocab_size": 128256, "max_position_embeddings": 131072, "tie_word_embeddings": False},
    "mistral-nemo-12b": {"model_type": "mistral", "hidden_size": 5120, "intermediate_size": 14336,
                         "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
                         "head_dim": 128, "vocab_size": 131072, "max_position_embeddings": 1024000,
                         "tie_word_embeddings": False},
    "qwen3-0.6b": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "qwen3-8b": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "qwen3-32b": {**_QWEN3, "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
                  "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "qwen3-30b-a3b": {**_QWEN3_MOE, "hidden_size": 2048, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "num_experts": 128, "num_experts_per_tok": 8},
    "qwen3-235b-a22b": {**_QWEN3_MOE, "hidden_size": 4096, "intermediate_size": 12288,
                        "moe_intermediate_size": 1536, "num_hidden_layers": 94, "num_attention_heads": 64,
                        "num_key_value_heads": 4, "num_experts": 128, "num_experts_per_tok": 8},
    "mixtral-8x7b": {**_MIXTRAL, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                     "num_local_experts": 8, "max_position_embeddings": 32768},
    "mixtral-8x22b": {**_MIXTRAL, "hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 56,
                      "num_attention_heads": 48, "num_key_value_heads": 8, "vocab_size": 32768,
                      "num_local_experts": 8, "max_position_embeddings": 65536},
    "deepseek-v2-lite": {**_DEEPSEEK_MLA, "model_type": "deepseek_v2", "hidden_size": 2048,
                         "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
                         "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
                         "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
                         "q_lora_rank": None, "vocab_size": 102400, "max_position_embeddings": 163840},
    "deepseek-v3": {**_DEEPSEEK_MLA, "model_type": "deepseek_v3", "hidden_size": 7168,
                    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
                    "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
                    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
                    "q_lora_rank": 1536, "vocab_size": 129280, "max_position_embeddings": 163840},
    "gemma-2-9b": {**_GEMMA2, "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256},
    "gemma-2-27b": {**_GEMMA2, "hidden_size": 4608, "intermediate_size": 36864, "num_hidden_layers": 46,
                    "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128},
    "phi-3-mini": {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "vocab_size": 32064, "max_position_embeddings": 4096, "tie_word_embeddings": False},
    "glm-4-9b": {"model_type": "glm", "hidden_size": 4096, "intermediate_size": 13696,
                 "num_hidden_layers": 40,
                 "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 151552,
                 "attention_bias": True, "max_position_embeddings": 131072, "tie_word_embeddings": False},
}  # fmt: skip
