"""ZeRO model states, the Korthikanti activation table, Llama-style constants, methods, offload."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest

from shardwise.planner import (
    PRESETS,
    Architecture,
    Cluster,
    Layout,
    ModelSpec,
    Pins,
    PlannerSettings,
    PlanRequest,
    TrainingSettings,
    evaluate,
    gpu,
    plan,
    preset,
)
from shardwise.planner import activations as act
from shardwise.planner.memory import (
    PRECISION_BYTES,
    model_context,
    optimizer_k,
    stage_counts,
    stage_model_states,
    zero_model_states,
)
from shardwise.planner.methods import QLORA_BYTES_PER_PARAM, lora_params_per_layer

GPT3 = PRESETS["gpt3-175b"].architecture


def _request(model: str = "llama-2-7b", gpus: int = 8, per_node: int = 8, **training: object) -> PlanRequest:
    return PlanRequest(
        model=preset(model),
        cluster=Cluster(gpus // per_node, per_node, gpu("H100")),
        training=TrainingSettings(**training),  # type: ignore[arg-type]
    )


# --- ZeRO (Rajbhandari et al. 2019, §5 table) ------------------------------------------------------

P, ND, K = 7_500_000_000, 64, 12


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (0, (2 * P, 2 * P, K * P)),
        (1, (2 * P, 2 * P, K * P // ND)),
        (2, (2 * P, (2 * P) // ND, K * P // ND)),
        (3, ((2 * P) // ND, (2 * P) // ND, K * P // ND)),
    ],
)
def test_zero_table_per_stage(stage: int, expected: tuple[int, int, int]) -> None:
    assert zero_model_states(P, ND, stage) == expected


@pytest.mark.parametrize(("stage", "gb"), [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_figure_1_example(stage: int, gb: float) -> None:
    # ZeRO paper Figure 1: Ψ = 7.5B, N_d = 64, K = 12.
    assert sum(zero_model_states(P, ND, stage)) / 1e9 == pytest.approx(gb, abs=0.05)


@pytest.mark.parametrize(
    ("precision", "per_param"),
    [("bf16", (2, 2, 12)), ("fp16", (2, 2, 12)), ("bf16-pure", (2, 2, 4)), ("fp32", (4, 4, 8))],
)
def test_precision_conventions(precision: str, per_param: tuple[int, int, int]) -> None:
    ctx = model_context(_request(precision=precision))
    c = stage_counts(ctx, 1, 1)[0]
    assert stage_model_states(ctx, c, 1, 0, "none")[:3] == tuple(b * c.params for b in per_param)


def test_tp_and_pp_shard_model_states_with_embedding_and_head_on_their_stages() -> None:
    arch = PRESETS["llama-2-7b"].architecture
    ctx = model_context(_request())
    whole = stage_counts(ctx, 1, 1)[0].params
    assert whole == arch.total_params
    first, last = stage_counts(ctx, 1, 2)
    assert first.params + last.params == whole
    assert first.params - last.params == arch.embedding_params - arch.output_params
    tp2 = stage_counts(ctx, 2, 1)[0].params
    norms = (2 * arch.layers + 1) * arch.norm_params  # replicated on every TP rank
    assert tp2 == pytest.approx((whole - norms) / 2 + norms, abs=arch.layers + 2)


def test_tied_embeddings_with_pipeline_keep_a_copy_on_the_last_stage() -> None:
    arch = PRESETS["gpt-1.7b"].architecture
    ctx = model_context(_request("gpt-1.7b"))
    one = stage_counts(ctx, 1, 1)[0].params
    first, last = stage_counts(ctx, 1, 2)
    assert one == arch.total_params  # counted once on a single stage
    assert first.params + last.params == one + arch.vocab_size * arch.hidden_size  # Megatron's copy


# --- Activations (Korthikanti et al. 2022, Table 2) ------------------------------------------------

S, B = 2048, 1


def _table(row: str, t: int) -> Fraction:
    s, b, h, a = S, B, GPT3.hidden_size, GPT3.heads
    sbh = Fraction(s * b * h)
    return {
        "none": sbh * (34 + Fraction(5 * a * s, h)),
        "tp": sbh * (10 + Fraction(24, t) + Fraction(5 * a * s, h * t)),
        "tp+sp": sbh * (Fraction(34, t) + Fraction(5 * a * s, h * t)),
        "tp+selective": sbh * (10 + Fraction(24, t)),
        "tp+sp+selective": sbh * Fraction(34, t),
        "full": 2 * sbh,
    }[row]


@pytest.mark.parametrize(
    ("row", "t", "sp", "ckpt"),
    [
        ("none", 1, False, "none"),
        ("tp", 8, False, "none"),
        ("tp", 4, False, "none"),
        ("tp+sp", 8, True, "none"),
        ("tp+selective", 8, False, "selective"),
        ("tp+sp+selective", 8, True, "selective"),
        ("full", 1, False, "full"),
        ("full", 8, False, "full"),
    ],
)
def test_korthikanti_table_exactly_for_gpt3(row: str, t: int, sp: bool, ckpt: act.Checkpointing) -> None:
    got = act.layer_activation_bytes(GPT3, S, B, tp=t, sequence_parallel=sp, checkpointing=ckpt)
    assert got == _table(row, t)


def test_korthikanti_breakdown_attention_mlp_norms() -> None:
    c = act.layer_coefficients(GPT3)
    assert (c.replicated, c.split, c.core) == (Fraction(10), Fraction(24), Fraction(5))


@pytest.mark.parametrize(
    ("model", "replicated", "split", "core"),
    [
        # SwiGLU, GQA, RMSNorm, no dropout: replicated 8, split 4 + 4·kv/a + 8·f/h, core 2.
        ("llama-2-7b", 8, 4 + 4 + Fraction(8 * 11008, 4096), 2),
        ("llama-2-70b", 8, 4 + Fraction(4 * 8, 64) + Fraction(8 * 28672, 8192), 2),
        ("chatglm3-6b", 8, 4 + Fraction(4 * 2, 32) + Fraction(8 * 13696, 4096), 2),
    ],
)
def test_llama_style_constants(model: str, replicated: int, split: Fraction, core: int) -> None:
    c = act.layer_coefficients(PRESETS[model].architecture)
    assert (c.replicated, c.split, c.core) == (Fraction(replicated), split, Fraction(core))


def test_llama_2_7b_layer_is_37_5_sbh_plus_2as2b() -> None:
    a = PRESETS["llama-2-7b"].architecture
    s = 4096
    got = act.layer_activation_bytes(a, s, 1)
    assert got == Fraction(75, 2) * s * a.hidden_size + 2 * a.heads * s * s


@pytest.mark.parametrize(
    ("stage", "pp", "m", "expected"), [(0, 4, 8, 4), (3, 4, 8, 1), (0, 4, 2, 2), (0, 1, 16, 1), (1, 8, 64, 7)]
)
def test_1f1b_in_flight_micro_batches(stage: int, pp: int, m: int, expected: int) -> None:
    assert act.in_flight_micro_batches(stage, pp, m) == expected


def test_first_stage_holds_l_layers_worth_whatever_pp() -> None:
    ctx = model_context(_request("gpt3-175b", gpus=64, per_node=8, sequence_length=2048))
    # The planner sums the runtime accounting (fused attention, measured norms: activations.py).
    rt = act.RUNTIME
    layer = act.layer_activation_bytes(
        GPT3, 2048, 1, tp=8, sequence_parallel=True, checkpointing="selective", accounting=rt
    )
    for pp in (1, 2, 4, 8):
        lay = Layout(8, pp, 8 // pp, 0, 1, 64, "selective", True, "none", 8, 8)
        first = evaluate(ctx.request, lay).per_stage[0]
        embedding = act.embedding_activation_bytes(GPT3, 2048, 1, 8, True) * pp
        extras = (
            act.output_activation_bytes(GPT3, 2048, 1, tp=8, sequence_parallel=True, accounting=rt)
            if pp == 1
            else 0
        )
        # + the transient attention core of the one layer being recomputed (selective)
        working = act.recompute_working_set_bytes(
            GPT3, 2048, 1, tp=8, sequence_parallel=True, checkpointing="selective", accounting=rt
        )
        assert first.activations == -(-(GPT3.layers * layer + embedding + extras + working) // 1)


@pytest.mark.parametrize(("p", "m", "factor"), [(4, 1, 1), (4, 2, Fraction(11, 8)), (8, 4, Fraction(39, 32))])
def test_interleaving_factor(p: int, m: int, factor: Fraction) -> None:
    assert act.interleave_factor(p, m) == factor


# --- Methods ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "rank", "total"),
    [
        (("q", "v"), 8, 4_194_304),  # PEFT's "trainable params" for LLaMA-2-7B, r=8 on q_proj, v_proj
        (("q", "k", "v", "o"), 16, 16_777_216),
        (("q", "k", "v", "o", "gate", "up", "down"), 16, 39_976_960),
    ],
)
def test_lora_adds_r_times_din_plus_dout(targets: tuple[str, ...], rank: int, total: int) -> None:
    arch = PRESETS["llama-2-7b"].architecture
    assert arch.layers * lora_params_per_layer(arch, rank, targets) == total


def test_lora_keeps_states_only_for_adapters() -> None:
    ctx = model_context(_request(method="lora", lora_rank=16))
    c = stage_counts(ctx, 1, 1)[0]
    w, g, o, _ = stage_model_states(ctx, c, 1, 0, "none")
    assert c.trainable == 16_777_216
    assert (w, g, o) == (2 * c.params + 2 * c.trainable, 2 * c.trainable, 12 * c.trainable)


def test_qlora_base_is_4_127_bits_for_linear_weights() -> None:
    arch = PRESETS["llama-2-7b"].architecture
    ctx = model_context(_request(method="qlora"))
    c = stage_counts(ctx, 1, 1)[0]
    quantized = arch.layers * arch.layer_matmul_weights
    expected = -(-quantized * QLORA_BYTES_PER_PARAM // 1) + 2 * (arch.total_params - quantized)
    assert c.frozen_bytes == expected
    assert float(QLORA_BYTES_PER_PARAM) == pytest.approx(0.5 + 0.127 / 8, abs=1e-4)  # paper: 0.127 bits


def test_freeze_trains_the_last_layers_only() -> None:
    arch = PRESETS["llama-2-7b"].architecture
    ctx = model_context(_request(method="freeze", trainable_fraction=0.25))
    c = stage_counts(ctx, 1, 1)[0]
    assert c.trainable == 8 * arch.layer_params
    assert c.active_layers == 8


def test_inference_is_weights_plus_kv_cache() -> None:
    arch = PRESETS["llama-2-7b"].architecture
    request = dataclasses.replace(
        _request(method="inference", sequence_length=4096, global_batch_size=1, precision="fp16"),
        cluster=Cluster(1, 1, gpu("A100-80GB")),
        settings=PlannerSettings(respect_runtime=False),  # the memory model; the trainer refuses it
    )
    result = plan(request)
    assert result.feasible and result.choice is not None
    m = result.choice.memory
    assert (m.parameters, m.gradients, m.optimizer_states) == (2 * arch.total_params, 0, 0)
    assert m.activations == 2 * 32 * 32 * 128 * 4096 * 1 * 2 == 2 * 2**30  # 2·L·kv·hd·s·b·dtype


def test_parameter_count_only_reports_activations_unknown() -> None:
    request = PlanRequest(
        model=ModelSpec("custom", parameter_count=7_000_000_000), cluster=Cluster(1, 8, gpu("H100"))
    )
    result = plan(request)
    data = result.to_json()
    assert data["memory_per_gpu"]["activations"] is None
    assert any("activations are unknown" in n for n in data["notes"])


def test_offload_moves_states_to_host_and_counts_it_per_node() -> None:
    request = dataclasses.replace(
        _request(gpus=1, per_node=1, global_batch_size=8), pins=Pins(zero_stage=2, offload="optimizer")
    )
    request = dataclasses.replace(request, cluster=Cluster(1, 1, gpu("A100-80GB")))
    result = plan(request)
    assert result.feasible and result.choice is not None
    p = PRESETS["llama-2-7b"].architecture.total_params
    assert result.choice.cpu_memory_per_node == 16 * p  # fp32 grads + master + 2 moments
    m = result.choice.memory
    assert (m.gradients, m.optimizer_states) == (0, 0)


def test_small_architecture_accepts_defaults() -> None:
    a = Architecture(layers=2, hidden_size=64, heads=4, vocab_size=256)
    assert a.kv_heads == 4 and a.ffn_hidden_size == 256  # 2/3 of 4h rounded up to 256


@pytest.mark.parametrize(("zero", "k"), [(0, 8), (1, 12), (2, 12), (3, 12)])
def test_fp32_optimizer_bytes_include_deepspeeds_fp32_partition_under_zero(zero: int, k: int) -> None:
    """fp32 without ZeRO: the weights are the master (K=8); with ZeRO DeepSpeed keeps a flat fp32
    partition of its own as well (K=12), which the trainer's fidelity test measures."""
    assert optimizer_k(PRECISION_BYTES["fp32"], zero) == k
    assert optimizer_k(PRECISION_BYTES["bf16"], zero) == 12
    assert optimizer_k(PRECISION_BYTES["bf16-pure"], zero) == 4
