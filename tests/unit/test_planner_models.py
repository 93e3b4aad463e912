"""Sizes, presets, parameter counts, Hugging Face config parsing and the GPU catalog."""

from __future__ import annotations

import pytest

from shardwise.planner import (
    PRESETS,
    Architecture,
    PlanInputError,
    find_gpu,
    gpu,
    parse_hf_config,
    split_layers,
)
from shardwise.planner.units import parse_count, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * 2**30),
        ("80GB", 80 * 10**9),
        ("1.5TiB", int(1.5 * 2**40)),
        ("512Mi", 512 * 2**20),
        ("1000", 1000),
        (4096, 4096),
        ("  80 gb ", 80 * 10**9),
    ],
)
def test_parse_size_keeps_decimal_and_binary_units_apart(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "24XB", "-5GiB", "0", "GiB", "1.2.3GB"])
def test_parse_size_rejects_bad_sizes_naming_them(text: str) -> None:
    with pytest.raises(PlanInputError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7e9", 7_000_000_000), ("70B", 70_000_000_000), ("1.5T", 1_500_000_000_000), (7, 7)],
)
def test_parse_count(text: str | int, expected: int) -> None:
    assert parse_count(text) == expected


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("gpt")])
def test_hugging_face_presets_match_their_published_parameter_counts_exactly(name: str) -> None:
    preset = PRESETS[name]
    assert preset.architecture.total_params == preset.published_parameters


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("gpt-")])
def test_gpt_presets_follow_narayanan_formula_and_table_1(name: str) -> None:
    a = PRESETS[name].architecture
    n_layers, h, v, s = a.layers, a.hidden_size, a.vocab_size, a.max_sequence_length
    # P = 12·L·h²·(1 + 13/(12h) + (v + s)/(12·L·h)), i.e. 12Lh² + 13Lh + (v + s)h; the paper
    # leaves out the final LayerNorm (2h), which we count.
    assert a.total_params == 12 * n_layers * h * h + 13 * n_layers * h + (v + s) * h + 2 * h
    published_billions = PRESETS[name].published_parameters / 1e9
    assert round(a.total_params / 1e9, 1) == pytest.approx(published_billions, abs=0.051)


def test_gpt3_preset_shape() -> None:
    a = PRESETS["gpt3-175b"].architecture
    assert (a.heads, a.hidden_size, a.layers, a.vocab_size, a.max_sequence_length) == (
        96,
        12288,
        96,
        51200,
        2048,
    )
    assert (a.mlp, a.ffn_hidden_size, a.kv_heads, a.dropout) == ("gelu", 4 * 12288, 96, True)
    assert round(a.total_params / 1e9) == 175


def test_tied_embeddings_counted_once() -> None:
    untied = Architecture(layers=2, hidden_size=64, heads=4, vocab_size=256)
    tied = Architecture(layers=2, hidden_size=64, heads=4, vocab_size=256, tied_embeddings=True)
    assert untied.total_params - tied.total_params == 256 * 64


def test_qwen2_vl_adds_the_vision_tower() -> None:
    assert PRESETS["qwen2-vl-72b"].architecture.total_params - PRESETS[
        "qwen2-72b"
    ].architecture.total_params == (699_356_672)


@pytest.mark.parametrize(
    ("config", "preset"),
    [
        (
            {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32,
             "num_hidden_layers": 32, "intermediate_size": 11008, "vocab_size": 32000,
             "max_position_embeddings": 4096, "tie_word_embeddings": False},
            "llama-2-7b",
        ),
        (
            {"model_type": "qwen2", "hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8,
             "num_hidden_layers": 80, "intermediate_size": 29568, "vocab_size": 152064,
             "max_position_embeddings": 131072, "tie_word_embeddings": False},
            "qwen2-72b",
        ),
        (
            {"model_type": "qwen2_vl", "hidden_size": 8192, "num_attention_heads": 64,
             "num_key_value_heads": 8, "num_hidden_layers": 80, "intermediate_size": 29568,
             "vocab_size": 152064, "max_position_embeddings": 32768, "tie_word_embeddings": False,
             "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
                               "in_chans": 3, "hidden_size": 8192, "patch_size": 14,
                               "spatial_merge_size": 2, "temporal_patch_size": 2}},
            "qwen2-vl-72b",
        ),
        (
            {"model_type": "chatglm", "num_layers": 28, "hidden_size": 4096, "num_attention_heads": 32,
             "multi_query_attention": True, "multi_query_group_num": 2, "ffn_hidden_size": 13696,
             "padded_vocab_size": 65024, "seq_length": 8192, "add_qkv_bias": True, "rmsnorm": True},
            "chatglm3-6b",
        ),
        (
            {"model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32,
             "num_key_value_heads": 8, "num_hidden_layers": 32, "intermediate_size": 14336,
             "vocab_size": 32000, "max_position_embeddings": 32768, "tie_word_embeddings": False},
            "mistral-7b",
        ),
    ],
)  # fmt: skip
def test_hf_config_gives_the_preset_parameter_count(config: dict[str, object], preset: str) -> None:
    assert parse_hf_config(config).total_params == PRESETS[preset].published_parameters


def test_hf_config_gpt2_small_is_124m() -> None:
    gpt2 = {
        "model_type": "gpt2",
        "n_embd": 768,
        "n_head": 12,
        "n_layer": 12,
        "vocab_size": 50257,
        "n_positions": 1024,
    }
    assert parse_hf_config(gpt2).total_params == 124_439_808  # the published GPT-2 small count


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "bert"}, "not a decoder-only language model: not supported"),
        ({"model_type": "llama"}, "missing hidden_size"),
    ],
)
def test_hf_config_errors_name_the_problem(config: dict[str, object], message: str) -> None:
    with pytest.raises(PlanInputError, match=message):
        parse_hf_config(config)


@pytest.mark.parametrize(
    ("layers", "pp", "expected"),
    [
        (32, 2, ((0, 16), (16, 32))),
        (10, 4, ((0, 2), (2, 4), (4, 7), (7, 10))),  # the extra layers go to the last stages
        (3, 3, ((0, 1), (1, 2), (2, 3))),
    ],
)
def test_split_layers_balanced_within_one(
    layers: int, pp: int, expected: tuple[tuple[int, int], ...]
) -> None:
    assert split_layers(layers, pp) == expected


@pytest.mark.parametrize(
    ("label", "name", "gib"),
    [
        ("NVIDIA-H100-80GB-HBM3", "H100-80GB-SXM", 79.6),
        ("NVIDIA-GeForce-RTX-4090", "RTX-4090", 24.0),
        ("NVIDIA-A100-SXM4-80GB", "A100-80GB", 80.0),
        ("NVIDIA-A100-SXM4-40GB", "A100-40GB", 40.0),
        ("NVIDIA-H200", "H200", 140.4),
        ("NVIDIA-L40S", "L40S", 45.0),
        ("NVIDIA-GeForce-RTX-3090", "RTX-3090", 24.0),
        ("Tesla-V100-SXM2-32GB", "V100-32GB", 32.0),
        ("NVIDIA-H100-PCIe", "H100-80GB-PCIe", 79.6),
    ],
)
def test_gpu_lookup_by_gfd_label(label: str, name: str, gib: float) -> None:
    found = find_gpu(label)
    assert found is not None
    assert found.name == name
    assert found.memory_bytes / 2**30 == pytest.approx(gib, abs=0.1)
    assert found.peak_flops > 0 and found.intra_node_bandwidth > 0


def test_unknown_gpu_needs_memory() -> None:
    assert gpu("NVIDIA-Future-GPU", 96 * 2**30).memory_bytes == 96 * 2**30
    with pytest.raises(PlanInputError, match="NVIDIA-Future-GPU"):
        gpu("NVIDIA-Future-GPU")
