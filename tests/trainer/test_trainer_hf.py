"""The optional Hugging Face model path: ``--hf-model DIR`` trains a local ``transformers`` model.

A tiny ``LlamaForCausalLM`` (2 layers, hidden 64, 4 heads, 2 kv heads, FFN 128, vocab 256) is
saved with ``save_pretrained`` (safetensors) to a temporary directory — never downloaded — and a
layout for the same architecture is planned with ``shardwise plan`` (fp32, 2 GPUs, DP2 ZeRO-2),
as for the other trainer tests. Under torchrun the trainer loads it, trains 8 steps on the
synthetic stream with the same DeepSpeed engine, loss, stats and per-rank lines as the built-in
model; the loss must go down and the DP2 ZeRO-2 curve must be the single-process one (same
tolerance as the equivalence tests). A config that disagrees with the layout, a TP layout and a
missing ``transformers`` are clear errors with exit code 2.

``transformers`` is an optional extra: without it these tests are skipped with a message, except
under ``CI=true`` where they fail (CI installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import layouts
import pytest
from test_trainer_equivalence import TOLERANCE
from trainer_runner import RunResult, run_trainer, trainer_env

pytestmark = pytest.mark.trainer

STEPS = 8
LR = 3e-3
#: The architecture of the tiny Llama model and of its layout (layouts.TINY_ARCH with 2 layers).
HF_ARCH: dict[str, Any] = {**layouts.TINY_ARCH, "layers": 2}
#: Run the trainer of this checkout, whatever copy of the package is installed.
TRAINER_SRC = Path(__file__).resolve().parents[2] / "trainer_image"


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TRAINER_SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def requires_transformers() -> None:
    try:
        import transformers  # noqa: F401, PLC0415 - optional extra
    except ImportError as exc:
        message = f"transformers is not importable ({exc}; optional: pip install transformers)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: the HF model tests cannot be skipped under CI=true")
        pytest.skip(f"{message}: HF model tests skipped")


@pytest.fixture(scope="module")
def hf_layouts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Layouts for HF_ARCH: DP2 ZeRO-2, the single-process reference, TP2 (rejected)."""
    workdir = tmp_path_factory.mktemp("hf-layouts")
    knobs = {
        "dp2-zero2": {"dp": 2, "zero": 2},
        "single": {"micro_batch": 2},
        "tp2": {"tp": 2, "micro_batch": 2},
    }
    out: dict[str, Path] = {}
    with pytest.MonkeyPatch.context() as mp:  # register the architecture with the layout helpers
        mp.setitem(layouts.ARCHS, "hf-llama", HF_ARCH)
        mp.setitem(layouts.LR, "hf-llama", LR)
        for name, kw in knobs.items():
            out[name] = workdir / f"{name}.json"
            layouts.make_layout(out[name], arch="hf-llama", **kw)
    yield out


@pytest.fixture(scope="module")
def hf_model_dir(requires_transformers: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved locally with save_pretrained (safetensors); built from a config, offline."""
    import torch  # noqa: PLC0415 - only with transformers present
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    config = LlamaConfig(
        num_hidden_layers=HF_ARCH["layers"],
        hidden_size=HF_ARCH["hidden_size"],
        num_attention_heads=HF_ARCH["heads"],
        num_key_value_heads=HF_ARCH["kv_heads"],
        intermediate_size=HF_ARCH["ffn_hidden_size"],
        vocab_size=HF_ARCH["vocab_size"],
        max_position_embeddings=HF_ARCH["max_sequence_length"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf-model")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    assert (path / "model.safetensors").exists()
    return path


@pytest.fixture(scope="module")
def dp2_run(hf_model_dir: Path, hf_layouts: dict[str, Path]) -> RunResult:
    return run_trainer(
        hf_layouts["dp2-zero2"],
        nproc=2,
        steps=STEPS,
        args=("--hf-model", str(hf_model_dir), "--lr", str(LR)),
        env=_env(),
    )


def test_hf_model_trains_under_dp2_zero2(dp2_run: RunResult) -> None:
    losses = dp2_run.losses
    assert sorted(losses) == list(range(1, STEPS + 1)), dp2_run.stderr[-3000:]
    assert losses[STEPS] < losses[1] - 0.05, losses
    assert [r["rank"] for r in dp2_run.ranks] == [0, 1]
    for r in dp2_run.ranks:
        assert r["model_state_bytes"] > 0 and r["peak_memory_bytes"] > 0, r
        predicted = r.get("predicted_model_state_bytes")
        if predicted:  # the planned layout: the HF model is the architecture it was planned for
            assert abs(r["model_state_bytes"] - predicted) <= 0.05 * predicted, r
    assert dp2_run.done["steps"] == STEPS


def test_hf_model_dp2_zero2_matches_single_process(
    dp2_run: RunResult, hf_model_dir: Path, hf_layouts: dict[str, Path]
) -> None:
    single = run_trainer(
        hf_layouts["single"],
        nproc=1,
        steps=STEPS,
        args=("--hf-model", str(hf_model_dir), "--lr", str(LR)),
        env=_env(),
    ).losses
    diffs = {s: abs(loss - single[s]) for s, loss in dp2_run.losses.items()}
    assert max(diffs.values()) <= TOLERANCE, diffs


def _trainer(layout: Path, model_dir: Path, *, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """One process, no torchrun: the errors below happen before any process group exists."""
    argv = ["--layout", str(layout), "--hf-model", str(model_dir), "--synthetic-data", "--steps", "1"]
    cmd = [sys.executable, "-m", "shardwise_trainer", *argv]
    if code is not None:
        cmd = [sys.executable, "-c", code, *argv]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=trainer_env(_env()), timeout=300, check=False
    )


@pytest.mark.parametrize(
    "mismatch",
    [("kv_heads", 4, "num_key_value_heads"), ("vocab_size", 512, "vocab_size")],
    ids=["kv_heads", "vocab_size"],
)
def test_config_mismatch_exits_2(
    hf_model_dir: Path, hf_layouts: dict[str, Path], tmp_path: Path, mismatch: tuple[str, int, str]
) -> None:
    field, value, hf_field = mismatch
    doc = json.loads(hf_layouts["dp2-zero2"].read_text())
    doc["model"]["architecture"][field] = value
    bad = tmp_path / "mismatch.json"
    bad.write_text(json.dumps(doc))
    proc = _trainer(bad, hf_model_dir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"model.architecture.{field}={value}" in proc.stderr, proc.stderr[-3000:]
    assert hf_field in proc.stderr


def test_tp_layout_with_hf_model_of_an_unmapped_family_exits_2(
    hf_model_dir: Path, hf_layouts: dict[str, Path]
) -> None:
    """AutoTP runs the Llama / Mistral / Qwen2 families (test_trainer_hf_tp.py); a layout whose
    family is not one of them is refused before torch loads, naming the limit."""
    doc = json.loads(hf_layouts["tp2"].read_text())
    doc["model"]["architecture"]["family"] = "custom"
    layout = hf_layouts["tp2"].with_name("tp2-custom.json")
    layout.write_text(json.dumps(doc))
    proc = _trainer(layout, hf_model_dir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "tp=2 for model family custom" in proc.stderr and "Llama / Mistral / Qwen2" in proc.stderr


_BLOCK_TRANSFORMERS = """
import sys

class _NoTransformers:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, _NoTransformers())
from shardwise_trainer.__main__ import main
sys.argv[0] = "shardwise-train"
sys.exit(main(sys.argv[1:]))
"""


def test_missing_transformers_exits_2(hf_layouts: dict[str, Path], tmp_path: Path) -> None:
    """Runs with or without transformers installed (it is hidden from the trainer)."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"")
    proc = _trainer(hf_layouts["dp2-zero2"], model_dir, code=_BLOCK_TRANSFORMERS)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "needs the package `transformers`" in proc.stderr
