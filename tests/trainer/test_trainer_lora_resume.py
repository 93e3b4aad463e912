"""LoRA resume: a peft adapter run checkpointed at step 4 resumes its adapter and AdamW state, at the
same layout and at another DP size / ZeRO stage, and continues the uninterrupted run's losses."""

from __future__ import annotations

from pathlib import Path

import finetune_layouts as fl
import pytest
from test_trainer_equivalence import TOLERANCE
from tests import tiny_models
from trainer_runner import run_trainer

pytestmark = pytest.mark.trainer

STEPS = 8
EVERY = 4
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lora-resume")
    return tiny_models.llama(root / "llama"), tiny_models.skewed_tokens(root / "tokens.bin")


def _layout(path: Path, gpus: int, zero: int) -> Path:
    job = fl.manifest(tiny_models.SPEC_ARCH["llama"], "lora", loraRank=4, loraTargets=TARGETS)
    fl.plan_layout(path, job, gpus=gpus, zero=zero, micro_batch=2)
    return path


@pytest.mark.parametrize(("saved", "resumed_at"), [((2, 2), (2, 2)), ((2, 2), (1, 0))])
def test_lora_resumes_adapter_and_optimizer(
    pretrained: tuple[Path, Path], tmp_path: Path, saved: tuple[int, int], resumed_at: tuple[int, int]
) -> None:
    model, data = pretrained
    base = ("--hf-model", str(model), "--data", str(data))
    at = _layout(tmp_path / "resumed.json", *resumed_at)
    reference = run_trainer(at, nproc=resumed_at[0], steps=STEPS, args=base).losses
    ckpt = tmp_path / "ckpt"
    args = (*base, "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(EVERY))
    first = run_trainer(_layout(tmp_path / "saved.json", *saved), nproc=saved[0], steps=EVERY, args=args)
    assert first.done["steps"] == EVERY

    resumed = run_trainer(at, nproc=resumed_at[0], steps=STEPS, args=args)
    assert resumed.done["resumed_from"] == EVERY
    assert resumed.events["resume"][0]["universal"] is (saved != resumed_at)
    assert sorted(resumed.losses) == list(range(EVERY + 1, STEPS + 1))
    diffs = {s: abs(loss - reference[s]) for s, loss in resumed.losses.items()}
    assert max(diffs.values()) <= TOLERANCE, diffs
