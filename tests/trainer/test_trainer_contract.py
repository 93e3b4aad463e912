"""The contract module (imports without torch), layout validation, the DeepSpeed config adapter,
the rank order against DeepSpeed's topology, and the Prometheus rendering."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from layouts import hand_layout
from prometheus_client.parser import text_string_to_metric_families

from shardwise.storage_spec import DATA_FORMATS, PACKING
from shardwise_trainer import contract, dsconfig, metrics
from shardwise_trainer.data import packing, records

pytestmark = pytest.mark.trainer


def test_contract_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "import shardwise_trainer.contract as c, shardwise_trainer.dsconfig\n"
        "heavy = ('torch', 'deepspeed', 'kopf', 'shardwise')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
        "print(c.ENV_LAYOUT_FILE)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "SHARDWISE_LAYOUT_FILE"


def test_env_names_and_defaults() -> None:
    assert set(contract.OPERATOR_ENV) == set(contract.ENV_DEFAULTS)
    assert contract.env(contract.ENV_LAYOUT_FILE, {}) == "/etc/shardwise/layout.json"
    assert contract.env(contract.ENV_CHECKPOINT_DIR, {contract.ENV_CHECKPOINT_DIR: "/ckpt"}) == "/ckpt"
    assert contract.env_int(contract.ENV_METRICS_PORT, {}) == 0
    with pytest.raises(contract.ContractError, match="SHARDWISE_METRICS_PORT"):
        contract.env_int(contract.ENV_METRICS_PORT, {contract.ENV_METRICS_PORT: "http"})
    with pytest.raises(KeyError):
        contract.env("RANK", {})


@pytest.mark.parametrize(("tp", "pp", "dp"), [(1, 1, 4), (2, 1, 2), (1, 2, 2), (2, 2, 2), (4, 2, 1)])
def test_rank_order_is_deepspeeds_topology(tp: int, pp: int, dp: int) -> None:
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    for rank in range(tp * pp * dp):
        coord = topo.get_coord(rank)
        assert contract.coords_of(rank, tp=tp, dp=dp) == (coord.pipe, coord.data, coord.model)
        assert contract.rank_of(coord.pipe, coord.data, coord.model, tp=tp, dp=dp) == rank


def _mutate(doc: dict[str, Any], section: str, **changes: Any) -> dict[str, Any]:
    doc[section] = {**doc[section], **changes}
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({**hand_layout(), "version": 2}, "version 2"),
        (_mutate(hand_layout(), "layout", tp=3), "not divisible by tp=3"),
        (_mutate(hand_layout(), "layout", grad_accum=3), "global_batch_size"),
        (_mutate(hand_layout(pp=2), "layout", zero_stage=2), "ZeRO stage 0 or 1"),
        (_mutate(hand_layout(), "training", method="lora"), "needs training.lora_rank"),
        (_mutate(hand_layout(), "training", method="distill"), "training.method"),
        (_mutate(hand_layout(), "training", precision="fp8"), "training.precision"),
        (_mutate(hand_layout(pp=2), "ranks", stage_layers=[[0, 1], [2, 4]]), "not contiguous"),
        (_mutate(hand_layout(), "ranks", order=["tp", "dp", "pp"]), "ranks.order"),
        ({**hand_layout(), "model": {"name": "x", "parameters": 7, "architecture": None}}, "architecture"),
        (_mutate(hand_layout(), "layout", sp=3), "sp=3: training.sequence_length=32 is not a multiple"),
        (_mutate(hand_layout(), "layout", sp=8), "sp=8: the model's 4 attention heads do not split"),
    ],
)
def test_invalid_layouts_are_rejected_clearly(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(contract.ContractError, match=message):
        contract.parse_layout(doc)


def test_layout_parses_and_default_stage_split() -> None:
    doc = hand_layout(pp=2, dp=2, zero=1)
    del doc["ranks"]["stage_layers"]
    layout = contract.parse_layout(doc)
    assert (layout.tp, layout.pp, layout.dp, layout.world_size) == (1, 2, 2, 4)
    assert layout.stage_layers == ((0, 2), (2, 4))
    assert layout.predicted_model_state_bytes(0) is None


def test_a_sequence_parallel_layout_needs_sp_ranks_per_replica() -> None:
    from shardwise_trainer import dsconfig  # noqa: PLC0415

    doc = _mutate(hand_layout(dp=2, zero=3), "layout", sp=2)
    layout = contract.parse_layout(doc)
    assert (layout.sp, layout.dp, layout.world_size) == (2, 2, 4)
    adapted = dsconfig.adapt(
        {"zero_optimization": {"stage": 3, "reduce_scatter": False}}, layout, on_cpu=True, autotp=True
    )
    assert adapted.config["sequence_parallel_size"] == 2
    assert adapted.config["train_batch_size"] == layout.global_batch_size  # samples, not slices
    assert adapted.config["zero_optimization"]["reduce_scatter"] is True
    assert contract.parse_layout(hand_layout()).sp == 1  # absent: 1


def test_ds_config_adapted_for_cpu() -> None:
    doc = hand_layout(dp=2, zero=2)
    doc["training"]["precision"] = "fp16"
    config = {
        "train_batch_size": 64,
        "fp16": {"enabled": True},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    }
    layout = contract.parse_layout(doc)
    cpu = dsconfig.adapt(config, layout, on_cpu=True)
    assert cpu.config["train_batch_size"] == 4 and cpu.config["gradient_accumulation_steps"] == 2
    assert "fp16" not in cpu.config and cpu.config["bf16"] == {"enabled": True}
    # Offload runs on CPU too, stepped by DeepSpeedCPUAdam (no torch_adam), pin_memory off.
    assert cpu.config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert "torch_adam" not in cpu.config["optimizer"]["params"]
    assert len(cpu.changes) == 2, cpu.changes
    gpu = dsconfig.adapt(config, layout, on_cpu=False)
    assert gpu.config["fp16"]["enabled"] and gpu.config["zero_optimization"]["offload_optimizer"]
    assert "torch_adam" not in gpu.config["optimizer"]["params"]
    plain = {**config, "zero_optimization": {"stage": 2}}
    assert dsconfig.adapt(plain, layout, on_cpu=True).config["optimizer"]["params"]["torch_adam"] is True
    pinned = {
        **config,
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
    }
    off = dsconfig.adapt(pinned, layout, on_cpu=True).config["zero_optimization"]["offload_optimizer"]
    assert off == {"device": "cpu", "pin_memory": False}
    explicit = {"optimizer": {"type": "Adam", "params": {"torch_adam": False}}}
    assert dsconfig.adapt(explicit, layout, on_cpu=False).config["optimizer"]["params"]["torch_adam"] is False
    assert config["train_batch_size"] == 64  # input untouched


def test_fp32_removes_mixed_precision_sections() -> None:
    layout = contract.parse_layout(hand_layout())
    out = dsconfig.adapt({"bf16": {"enabled": True}}, layout, on_cpu=True).config
    assert "bf16" not in out and "fp16" not in out
    assert out["optimizer"]["type"] == "AdamW"


def test_render_parses_as_prometheus_text() -> None:
    labels = {k: f'v"{k}\\' for k in metrics.LABELS}
    text = metrics.render(
        [
            {
                "labels": {**labels, "rank": "3"},
                "step": 7,
                "step_seconds": 0.5,
                "loss": 2.25,
                "memory_bytes": {"parameters": 10, "rss": 20},
                "predicted_model_state_bytes": None,
            }
        ]
    )
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == {
        "shardwise_trainer_step",
        "shardwise_trainer_step_seconds",
        "shardwise_trainer_loss",
        "shardwise_trainer_memory_bytes",
    }
    (sample,) = families["shardwise_trainer_loss"].samples
    assert sample.value == 2.25 and sample.labels["job"] == 'v"job\\' and sample.labels["rank"] == "3"
    kinds = {s.labels["kind"]: s.value for s in families["shardwise_trainer_memory_bytes"].samples}
    assert kinds == {"parameters": 10.0, "rss": 20.0}


def test_cli_rejects_a_bad_layout_with_exit_code_2(tmp_path: Path) -> None:
    """A contract error is permanent: exit 2 and a message naming the key, before torch loads."""
    doc = _mutate(hand_layout(), "layout", tp=3)
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "shardwise_trainer", "--layout", str(path), "--synthetic-data"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "not divisible by tp=3" in proc.stderr
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardwise_trainer",
            "--layout",
            str(tmp_path / "nope.json"),
            "--synthetic-data",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert missing.returncode == 2 and "SHARDWISE_LAYOUT_FILE" in missing.stderr


def test_data_formats_and_packing_match_the_operators_spec() -> None:
    """spec.data.format / packing (CRD enum, operator parser) are exactly what the trainer reads."""
    assert set(DATA_FORMATS) == set(records.FORMATS)
    assert set(PACKING) == set(packing.POLICIES)
