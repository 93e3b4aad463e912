"""Tensor parallelism of a pretrained Hugging Face model: DeepSpeed AutoTP, trained and exported.

The tiny Llama of test_trainer_hf.py (random weights saved with ``save_pretrained``, loaded with
``--hf-model``) trains 8 steps at TP2 (ZeRO-1, two ranks, AutoTP shards q / k / v / gate / up by
rows and o / down by columns) and must follow the single-process curve within the equivalence
tests' tolerance. With ``--output-dir`` the TP shards are gathered into one Hugging Face
directory, which ``transformers`` loads in a fresh process and whose loss on the probe batch is
the trained model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import layouts
import pytest
from test_trainer_equivalence import TOLERANCE
from test_trainer_hf import HF_ARCH, LR, STEPS, _env, hf_model_dir, requires_transformers  # noqa: F401
from trainer_runner import RunResult, run_trainer

pytestmark = pytest.mark.trainer

#: Figures the report quotes (max |Δloss| per case), printed by -s.
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def tp_layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    workdir = tmp_path_factory.mktemp("hf-tp-layouts")
    knobs: dict[str, dict[str, Any]] = {
        "single": {"micro_batch": 2},
        "tp2": {"tp": 2, "micro_batch": 2, "zero": 1},
    }
    out: dict[str, Path] = {}
    with pytest.MonkeyPatch.context() as mp:
        # AutoTP runs for the Llama / Mistral / Qwen2 families (capabilities.TABLE).
        mp.setitem(layouts.ARCHS, "hf-llama", {**HF_ARCH, "family": "llama"})
        mp.setitem(layouts.LR, "hf-llama", LR)
        for name, kw in knobs.items():
            out[name] = workdir / f"{name}.json"
            layouts.make_layout(out[name], arch="hf-llama", **kw)
    return out


def run_hf(layout: Path, nproc: int, model: Path, *extra: str, steps: int = STEPS) -> RunResult:
    """The trainer of this checkout on the tiny pretrained model, at the HF tests' learning rate."""
    args = ("--hf-model", str(model), "--lr", str(LR), *extra)
    return run_trainer(layout, nproc=nproc, steps=steps, args=args, env=_env())


@pytest.fixture(scope="module")
def single(hf_model_dir: Path, tp_layouts: dict[str, Path]) -> RunResult:  # noqa: F811
    return run_hf(tp_layouts["single"], 1, hf_model_dir)


@pytest.fixture(scope="module")
def tp2(
    hf_model_dir: Path,  # noqa: F811
    tp_layouts: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> RunResult:
    out = tmp_path_factory.mktemp("hf-tp2-out") / "model"
    run = run_hf(tp_layouts["tp2"], 2, hf_model_dir, "--output-dir", str(out))
    run.output_dir = out  # type: ignore[attr-defined]
    return run


def test_tp2_matches_single_process(single: RunResult, tp2: RunResult) -> None:
    assert sorted(tp2.losses) == list(range(1, STEPS + 1)), tp2.stderr[-3000:]
    diffs = {s: abs(loss - single.losses[s]) for s, loss in tp2.losses.items()}
    FIGURES["hf-tp2-zero1"] = max(diffs.values())
    print(f"hf TP2 ZeRO-1 vs single: max |dloss| = {max(diffs.values()):.2e}")
    assert max(diffs.values()) <= TOLERANCE, diffs
    assert single.losses[STEPS] < single.losses[1] - 0.05


def test_tp2_export_loads_with_transformers_and_reproduces_the_loss(
    tp2: RunResult, tp_layouts: dict[str, Path]
) -> None:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    out = tp2.output_dir  # type: ignore[attr-defined]
    event = tp2.events["output"][0]
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (HF_ARCH["hidden_size"],) * 2
    assert model.model.layers[0].mlp.down_proj.weight.shape == (
        HF_ARCH["hidden_size"],
        HF_ARCH["ffn_hidden_size"],
    )
    from shardwise_trainer.contract import load_layout  # noqa: PLC0415
    from shardwise_trainer.data import TokenSource  # noqa: PLC0415
    from shardwise_trainer.model import TPContext, lm_loss  # noqa: PLC0415

    seq = load_layout(tp_layouts["tp2"]).sequence_length
    # seed: the trainer's --seed default, so this is the trainer's probe batch
    source = TokenSource(vocab_size=HF_ARCH["vocab_size"], sequence_length=seq, seed=1234, path=None)
    ids, labels = source.micro_batch(step=0, micro=0, dp_rank=0, dp=1, micro_batch=2, global_batch=2)[:2]
    with torch.no_grad():
        loss = float(lm_loss(model(input_ids=ids).logits, labels, TPContext(1, 0, None)))
    assert abs(loss - event["probe_loss"]) <= 1e-4, (loss, event)
