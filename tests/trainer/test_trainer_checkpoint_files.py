"""The checkpoint directory's bookkeeping (checkpointing.py): complete tags, `latest`, pruning, cadence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardwise_trainer import checkpointing as ck
from shardwise_trainer import contract
from shardwise_trainer.model import PipelineNames


def _tag(root: Path, step: int, *, complete: bool = True) -> Path:
    path = root / ck.tag_of(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_text("x")
    if complete:
        (path / ck.COMPLETE).write_text(ck.tag_of(step))
    return path


def test_partial_tag_is_ignored_and_pruned(tmp_path: Path) -> None:
    _tag(tmp_path, 4)
    _tag(tmp_path, 8, complete=False)  # died while saving
    (tmp_path / ck.LATEST).write_text("step8")  # even if `latest` names it
    assert ck.latest_step(tmp_path) == 4
    assert ck.prune(tmp_path, keep=5, partial=True) == ["step8"]
    assert not (tmp_path / "step8").exists()


def test_keep_newest_and_their_universal_copies(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        _tag(tmp_path, step)
    (tmp_path / "step2-universal").mkdir()
    assert sorted(ck.prune(tmp_path, keep=2)) == ["step2", "step2-universal"]
    assert ck.complete_steps(tmp_path) == [4, 6]
    assert ck.latest_step(tmp_path) == 6


def test_empty_directory_has_nothing_to_resume(tmp_path: Path) -> None:
    assert ck.latest_step(tmp_path / "absent") is None
    assert ck.plan_resume(tmp_path, {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 0}) is None


@pytest.mark.parametrize(
    ("saved", "current", "universal"),
    [
        ({"tp": 1, "pp": 1, "dp": 2, "zero_stage": 2}, {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 2}, False),
        ({"tp": 1, "pp": 1, "dp": 2, "zero_stage": 2}, {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 2}, True),
        ({"tp": 1, "pp": 1, "dp": 2, "zero_stage": 2}, {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 3}, True),
        (
            {"tp": 2, "pp": 1, "dp": 1, "zero_stage": 1, "sharding_metadata": True},
            {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 1},
            True,
        ),
        (
            {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 0, "sharding_metadata": True},
            {"tp": 2, "pp": 1, "dp": 1, "zero_stage": 0},
            True,
        ),
        (
            {"tp": 1, "pp": 2, "dp": 2, "zero_stage": 1, "sharding_metadata": True},
            {"tp": 1, "pp": 1, "dp": 4, "zero_stage": 1},
            True,
        ),
    ],
)
def test_resume_converts_only_when_the_sharding_changed(
    tmp_path: Path, saved: dict[str, int], current: dict[str, int], universal: bool
) -> None:
    (_tag(tmp_path, 4) / ck.LAYOUT_FILE).write_text(json.dumps(saved))
    resume = ck.plan_resume(tmp_path, current)
    assert resume is not None
    assert (resume.step, resume.universal) == (4, universal)
    assert resume.tag == ("step4-universal" if universal else "step4")


def test_a_checkpoint_without_sharding_metadata_keeps_its_tp(tmp_path: Path) -> None:
    """Written before saves carried the TP slicing patterns: a resume at another TP would cut
    row-parallel weights along the wrong dim, so it is refused; another DP size still converts."""
    saved = {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 1}
    (_tag(tmp_path, 4) / ck.LAYOUT_FILE).write_text(json.dumps(saved))
    with pytest.raises(contract.ContractError, match="no TP slicing patterns or parameter names") as err:
        ck.plan_resume(tmp_path, {**saved, "tp": 2, "dp": 1})
    assert err.value.reason == "InvalidCheckpoint"
    resume = ck.plan_resume(tmp_path, {**saved, "dp": 1})
    assert resume is not None and resume.universal


@pytest.mark.parametrize(
    ("saved", "current", "named"),
    [
        (
            {"tp": 2, "pp": 2, "dp": 1, "zero_stage": 1},
            {"tp": 1, "pp": 2, "dp": 2, "zero_stage": 1},
            "tp 2 -> 1",
        ),
        (
            {"tp": 2, "pp": 2, "dp": 1, "zero_stage": 1},
            {"tp": 2, "pp": 1, "dp": 2, "zero_stage": 1},
            "pp 2 -> 1",
        ),
        (
            {"tp": 2, "pp": 1, "dp": 1, "zero_stage": 1},
            {"tp": 1, "pp": 2, "dp": 1, "zero_stage": 1},
            "tp 2 -> 1, pp 1 -> 2",
        ),
        (
            {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 2, "method": "lora"},
            {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 2, "method": "full"},
            "method lora -> full",
        ),
    ],
)
def test_a_checkpoint_that_cannot_be_converted_is_refused_not_ignored(
    tmp_path: Path, saved: dict[str, object], current: dict[str, object], named: str
) -> None:
    (_tag(tmp_path, 4) / ck.LAYOUT_FILE).write_text(json.dumps(saved))
    with pytest.raises(contract.ContractError, match=named) as err:
        ck.plan_resume(tmp_path, current)
    assert err.value.reason == "InvalidCheckpoint"
    assert "step4" in str(err.value) and "DP size, ZeRO stage, TP size" in str(err.value)


@pytest.mark.parametrize(
    ("steps", "minutes", "step", "elapsed", "due"),
    [
        (4, 0, 4, 0.0, True),
        (4, 0, 5, 1e9, False),  # steps only: the clock does not matter
        (0, 1.0, 3, 59.0, False),
        (0, 1.0, 3, 61.0, True),
        (4, 1.0, 3, 61.0, True),
        (0, 0, 3, 1e9, False),
    ],
)
def test_cadence(steps: int, minutes: float, step: int, elapsed: float, due: bool) -> None:
    cadence = ck.Cadence(steps, minutes, last_save=100.0)
    assert cadence.due_locally(step, 100.0 + elapsed) is due


@pytest.mark.parametrize(
    ("tied", "pipeline", "plain"),
    [
        (False, "0.weight", "embed.weight"),
        (False, "1.q.weight", "layers.0.q.weight"),
        (False, "4.down.weight", "layers.3.down.weight"),
        (False, "5.weight", "norm.weight"),
        (False, "6.weight", "head.weight"),
        (True, "tied_modules.embed.weight", "embed.weight"),
        (True, "tied_modules.embed.pos", "embed.pos"),
        (True, "5.bias", "norm.bias"),
    ],
)
def test_pipeline_and_plain_parameter_names_map_both_ways(tied: bool, pipeline: str, plain: str) -> None:
    names = PipelineNames(layers=4, tied=tied)
    assert names.plain(pipeline) == plain
    assert names.pipeline(plain) == pipeline
    assert names.plain(plain) == plain  # plain names stay plain


def test_the_tied_embeddings_copy_in_the_last_layer_file_is_the_embedding() -> None:
    assert PipelineNames(layers=4, tied=True).of_layer_file(6, "weight") == "embed.weight"
    assert PipelineNames(layers=4, tied=False).of_layer_file(6, "weight") == "head.weight"
    assert PipelineNames(layers=4, tied=False).of_layer_file(2, "q.weight") == "layers.1.q.weight"
