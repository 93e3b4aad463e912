"""Named model shapes (Hugging Face config.json values, Narayanan et al. 2021 Table 1 GPTs)."""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.planner.architecture import Architecture, ModelSpec
from shardwise.planner.decoder_configs import parse_decoder
from shardwise.planner.errors import PlanInputError
from shardwise.planner.hf_presets import HF_CONFIGS


@dataclass(frozen=True, slots=True)
class Preset:
    """A shape plus the parameter count its authors publish (tests hold the two together)."""

    name: str
    architecture: Architecture
    published_parameters: int
    source: str


def _llama(
    layers: int, h: int, a: int, kv: int, f: int, *, v: int, seq: int, family: str = "llama"
) -> Architecture:
    return Architecture(
        family=family,
        layers=layers,
        hidden_size=h,
        heads=a,
        kv_heads=kv,
        ffn_hidden_size=f,
        vocab_size=v,
        max_sequence_length=seq,
    )


def _qwen2(
    layers: int, h: int, a: int, kv: int, f: int, *, seq: int, extra: int = 0, family: str = "qwen2"
) -> Architecture:
    return Architecture(
        family=family,
        layers=layers,
        hidden_size=h,
        heads=a,
        kv_heads=kv,
        ffn_hidden_size=f,
        vocab_size=152064,
        max_sequence_length=seq,
        qkv_bias=True,
        extra_parameters=extra,
    )


def _gpt(layers: int, h: int, a: int) -> Architecture:
    # Narayanan et al. 2021 (arXiv:2104.04473) Table 1: v = 51200, s = 2048, GeLU 4h MLP,
    # multi-head attention, learned positions, tied embeddings, LayerNorm, dropout.
    return Architecture(
        family="gpt",
        layers=layers,
        hidden_size=h,
        heads=a,
        ffn_hidden_size=4 * h,
        vocab_size=51200,
        mlp="gelu",
        norm="layernorm",
        tied_embeddings=True,
        dropout=True,
        position_embedding="learned",
        max_sequence_length=2048,
    )


# Qwen2-VL-72B vision tower (config.json "vision_config": depth 32, embed_dim 1280, mlp_ratio 4,
# patch 14, temporal patch 2, spatial merge 2, merger to hidden 8192), counted from the modules:
# patch conv 3*2*14*14*1280 + 32 blocks * (2 LayerNorms 4*1280 + qkv 1280*3840+3840
# + proj 1280^2+1280 + fc1 1280*5120+5120 + fc2 5120*1280+1280) + merger (LayerNorm 2*1280
# + 5120^2+5120 + 5120*8192+8192) = 699,356,672; with the LM's 72,706,203,648 this gives the
# published 73,405,560,320.
QWEN2_VL_72B_VISION_PARAMS = 699_356_672

_HF = "Hugging Face config.json; published count = safetensors total"
_HF_BUILT = "Hugging Face config.json; count = the model transformers builds from it"
# Counts of the models transformers builds from hf_presets.HF_CONFIGS (tests/trainer/
# test_param_counts.py holds them equal); they equal the safetensors totals, except DeepSeek-V3's
# 685 B, which adds the 14 B multi-token-prediction module transformers does not build.
_HF_COUNTS = {
    "llama-3.1-8b": 8_030_261_248,
    "mistral-nemo-12b": 12_247_782_400,
    "qwen3-0.6b": 596_049_920,
    "qwen3-8b": 8_190_735_360,
    "qwen3-32b": 32_762_123_264,
    "qwen3-30b-a3b": 30_532_122_624,
    "qwen3-235b-a22b": 235_093_634_560,
    "mixtral-8x7b": 46_702_792_704,
    "mixtral-8x22b": 140_630_071_296,
    "deepseek-v2-lite": 15_706_484_224,
    "deepseek-v3": 671_026_404_352,
    "gemma-2-9b": 9_241_705_984,
    "gemma-2-27b": 27_227_128_320,
    "phi-3-mini": 3_821_079_552,
    "glm-4-9b": 9_399_951_360,
}
_NARAYANAN = "Narayanan et al. 2021 Table 1 (published count in billions, rounded)"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("llama-2-7b", _llama(32, 4096, 32, 32, 11008, v=32000, seq=4096), 6_738_415_616, _HF),
        Preset("llama-2-13b", _llama(40, 5120, 40, 40, 13824, v=32000, seq=4096), 13_015_864_320, _HF),
        Preset("llama-2-70b", _llama(80, 8192, 64, 8, 28672, v=32000, seq=4096), 68_976_648_192, _HF),
        Preset("llama-3-8b", _llama(32, 4096, 32, 8, 14336, v=128256, seq=8192), 8_030_261_248, _HF),
        Preset("llama-3-70b", _llama(80, 8192, 64, 8, 28672, v=128256, seq=8192), 70_553_706_496, _HF),
        Preset(
            "mistral-7b",
            _llama(32, 4096, 32, 8, 14336, v=32000, seq=32768, family="mistral"),
            7_241_732_096,
            _HF,
        ),
        Preset("qwen2-7b", _qwen2(28, 3584, 28, 4, 18944, seq=131072), 7_615_616_512, _HF),
        Preset("qwen2-72b", _qwen2(80, 8192, 64, 8, 29568, seq=131072), 72_706_203_648, _HF),
        Preset(
            "qwen2-vl-72b",
            _qwen2(80, 8192, 64, 8, 29568, seq=32768, extra=QWEN2_VL_72B_VISION_PARAMS),
            73_405_560_320,
            _HF + " (language model + vision tower)",
        ),
        Preset(
            "chatglm3-6b",
            # num_layers 28, hidden 4096, 32 heads, multi_query_group_num 2, ffn 13696,
            # padded_vocab_size 65024, seq_length 8192, add_qkv_bias, untied output layer.
            Architecture(
                family="chatglm",
                layers=28,
                hidden_size=4096,
                heads=32,
                kv_heads=2,
                ffn_hidden_size=13696,
                vocab_size=65024,
                max_sequence_length=8192,
                qkv_bias=True,
            ),
            6_243_584_000,
            _HF,
        ),
        Preset("gpt-1.7b", _gpt(24, 2304, 24), 1_700_000_000, _NARAYANAN),
        Preset("gpt-3.6b", _gpt(30, 3072, 32), 3_600_000_000, _NARAYANAN),
        Preset("gpt-7.5b", _gpt(36, 4096, 32), 7_500_000_000, _NARAYANAN),
        Preset("gpt-18.4b", _gpt(40, 6144, 48), 18_400_000_000, _NARAYANAN),
        Preset("gpt-39.1b", _gpt(48, 8192, 64), 39_100_000_000, _NARAYANAN),
        Preset("gpt-76.1b", _gpt(60, 10240, 80), 76_100_000_000, _NARAYANAN),
        Preset("gpt-145.6b", _gpt(80, 12288, 96), 145_600_000_000, _NARAYANAN),
        Preset("gpt-310.1b", _gpt(96, 16384, 128), 310_100_000_000, _NARAYANAN),
        Preset("gpt-529.6b", _gpt(105, 20480, 128), 529_600_000_000, _NARAYANAN),
        Preset("gpt-1t", _gpt(128, 25600, 160), 1_008_000_000_000, _NARAYANAN),
        # GPT-3 (Brown et al. 2020): a=96, h=12288, L=96, v=51200, s=2048 ("175B").
        Preset("gpt3-175b", _gpt(96, 12288, 96), 175_000_000_000, "Brown et al. 2020"),
        *(
            Preset(name, parse_decoder(config, str(config["model_type"])), _HF_COUNTS[name], _HF_BUILT)
            for name, config in HF_CONFIGS.items()
        ),
    )
}


def preset(name: str) -> ModelSpec:
    """The ModelSpec of a preset; PlanInputError names an unknown preset."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise PlanInputError(f"unknown model preset {name!r} (see `shardwise presets`)")
    return ModelSpec(name=key, architecture=PRESETS[key].architecture)
