"""Ulysses sequence parallelism of a pretrained Hugging Face model, trained, resumed and exported.

The tiny Llama of test_trainer_hf.py (random weights saved with ``save_pretrained``, loaded with
``--hf-model``, 4 heads, 2 key/value heads) trains 8 steps with each sample's 32 tokens split
over two ranks (DeepSpeed's ``UlyssesSPAttentionHF`` exchanges heads by all-to-all) and must
follow the single-process curve within the equivalence tests' tolerance: SP2 under ZeRO-1, 2
and 3, and SP2 × DP2 on four ranks. With ``--output-dir`` the result loads with
``transformers`` in this process and reproduces the trained model's probe loss; a run stopped
at step 4 resumes at the same layout and ends on the uninterrupted run's losses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import layouts
import pytest
from test_trainer_equivalence import TOLERANCE
from test_trainer_hf import HF_ARCH, LR, STEPS, hf_model_dir, requires_transformers  # noqa: F401
from test_trainer_hf_tp import run_hf
from trainer_runner import RunResult

pytestmark = pytest.mark.trainer

#: Figures the report quotes (max |Δloss| per case), printed by -s.
FIGURES: dict[str, float] = {}


def _with_sp(path: Path, sp: int) -> None:
    """The planned layout with sequence parallelism added (the planner does not choose sp yet)."""
    doc = json.loads(path.read_text())
    doc["layout"]["sp"] = sp
    path.write_text(json.dumps(doc, indent=1))


@pytest.fixture(scope="module")
def sp_layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    workdir = tmp_path_factory.mktemp("hf-sp-layouts")
    knobs: dict[str, tuple[dict[str, Any], int]] = {
        "single": ({"micro_batch": 2, "zero": 1}, 1),
        "sp2-zero1": ({"micro_batch": 2, "zero": 1}, 2),
        "sp2-zero2": ({"micro_batch": 2, "zero": 2}, 2),
        "sp2-zero3": ({"micro_batch": 2, "zero": 3}, 2),
        "sp2-dp2": ({"dp": 2, "micro_batch": 2, "zero": 1}, 2),
    }
    out: dict[str, Path] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(layouts.ARCHS, "hf-llama", {**HF_ARCH, "family": "llama"})
        mp.setitem(layouts.LR, "hf-llama", LR)
        for name, (kw, sp) in knobs.items():
            out[name] = workdir / f"{name}.json"
            layouts.make_layout(out[name], arch="hf-llama", **kw)
            if sp > 1:
                _with_sp(out[name], sp)
    return out


@pytest.fixture(scope="module")
def single(hf_model_dir: Path, sp_layouts: dict[str, Path]) -> RunResult:  # noqa: F811
    return run_hf(sp_layouts["single"], 1, hf_model_dir)


@pytest.fixture(scope="module")
def sp2(
    hf_model_dir: Path,  # noqa: F811
    sp_layouts: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> RunResult:
    out = tmp_path_factory.mktemp("hf-sp2-out") / "model"
    run = run_hf(sp_layouts["sp2-zero1"], 2, hf_model_dir, "--output-dir", str(out))
    run.output_dir = out  # type: ignore[attr-defined]
    return run


def _max_diff(run: RunResult, single: RunResult) -> float:
    assert sorted(run.losses) == list(range(1, STEPS + 1)), run.stderr[-3000:]
    return max(abs(loss - single.losses[s]) for s, loss in run.losses.items())


def test_sp2_matches_single_process(single: RunResult, sp2: RunResult) -> None:
    FIGURES["hf-sp2-zero1"] = diff = _max_diff(sp2, single)
    print(f"hf SP2 ZeRO-1 vs single: max |dloss| = {diff:.2e}")
    assert diff <= TOLERANCE, (sp2.losses, single.losses)
    assert single.losses[STEPS] < single.losses[1] - 0.05
    assert [r["rank"] for r in sp2.ranks] == [0, 1]


@pytest.mark.parametrize(("case", "nproc"), [("sp2-zero2", 2), ("sp2-zero3", 2), ("sp2-dp2", 4)])
def test_sp2_under_zero2_zero3_and_with_data_parallelism_matches_single_process(
    case: str,
    nproc: int,
    single: RunResult,
    hf_model_dir: Path,  # noqa: F811
    sp_layouts: dict[str, Path],
) -> None:
    run = run_hf(sp_layouts[case], nproc, hf_model_dir)
    FIGURES[f"hf-{case}"] = diff = _max_diff(run, single)
    print(f"hf {case} vs single: max |dloss| = {diff:.2e}")
    assert diff <= TOLERANCE, (run.losses, single.losses)


def test_sp2_export_loads_with_transformers_and_reproduces_the_loss(
    sp2: RunResult, sp_layouts: dict[str, Path]
) -> None:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from shardwise_trainer.contract import load_layout  # noqa: PLC0415
    from shardwise_trainer.data import TokenSource  # noqa: PLC0415
    from shardwise_trainer.model import TPContext, lm_loss  # noqa: PLC0415

    event = sp2.events["output"][0]
    model = AutoModelForCausalLM.from_pretrained(str(sp2.output_dir), dtype=torch.float32).eval()  # type: ignore[attr-defined]
    seq = load_layout(sp_layouts["sp2-zero1"]).sequence_length
    source = TokenSource(vocab_size=HF_ARCH["vocab_size"], sequence_length=seq, seed=1234, path=None)
    ids, labels = source.micro_batch(step=0, micro=0, dp_rank=0, dp=1, micro_batch=2, global_batch=2)[:2]
    with torch.no_grad():
        loss = float(lm_loss(model(input_ids=ids).logits, labels, TPContext(1, 0, None)))
    assert abs(loss - event["probe_loss"]) <= 1e-4, (loss, event)


def test_sp2_resumes_at_its_layout_on_the_uninterrupted_curve(
    sp2: RunResult,
    hf_model_dir: Path,  # noqa: F811
    sp_layouts: dict[str, Path],
    tmp_path: Path,
) -> None:
    ckpt = ("--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "4")
    first = run_hf(sp_layouts["sp2-zero1"], 2, hf_model_dir, *ckpt, steps=4)
    assert sorted(first.losses) == [1, 2, 3, 4], first.stderr[-3000:]
    second = run_hf(sp_layouts["sp2-zero1"], 2, hf_model_dir, *ckpt)
    assert second.events["resume"][0]["step"] == 4, second.stderr[-3000:]
    assert not second.events["resume"][0]["universal"]
    assert sorted(second.losses) == list(range(5, STEPS + 1)), second.stderr[-3000:]
    diffs = {s: abs(loss - sp2.losses[s]) for s, loss in second.losses.items()}
    assert max(diffs.values()) <= TOLERANCE, diffs
