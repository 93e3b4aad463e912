"""Checkpoints of the run: a cadence all ranks agree on, atomic tags, keep-K pruning, resume across layouts.

On disk, in the checkpoint directory::

    latest                     the tag of the newest COMPLETE checkpoint (written by rename)
    step8/                     DeepSpeed's files of one save, plus
    step8/shardwise-layout.json  the layout that wrote it (tp, pp, dp, zero stage, method) and
                                 whether the save carries TP slicing patterns
    step8/shardwise-complete     written by rank 0 after every rank finished its files
    step8-universal/           DeepSpeed's universal conversion of step8 (made once, on a resume
                               at another layout; reused by later restarts)

A tag without the completion marker is a save that died half-way: it is ignored and deleted on
resume. The data position needs no saving: each step's batch is a function of the step number
(data/order.py), so the resumed run reads from ``step`` on at any DP size.
"""

# ruff: noqa: PLC0415 - torch / DeepSpeed are imported by train.py before these run
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardwise_trainer import capabilities, contract
from shardwise_trainer.contract import Layout

log = logging.getLogger("shardwise_trainer.checkpointing")

LATEST = "latest"
LAYOUT_FILE = "shardwise-layout.json"
COMPLETE = "shardwise-complete"
UNIVERSAL_SUFFIX = "-universal"
TP_PATTERNS = "tp_patterns"
_TAG = re.compile(r"^step(\d+)$")


def tag_of(step: int) -> str:
    return f"step{step}"


def layout_record(layout: Layout) -> dict[str, Any]:
    """The layout facts a checkpoint's shards depend on (what must match to load it as is)."""
    return {
        "tp": layout.tp,
        "pp": layout.pp,
        "dp": layout.dp,
        "zero_stage": layout.zero_stage,
        "method": layout.method,
    }


def same_sharding(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    return all(saved.get(k) == current.get(k) for k in ("tp", "pp", "dp", "zero_stage"))


def complete_steps(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in ``directory``, oldest first."""
    steps = []
    if directory.is_dir():
        for child in directory.iterdir():
            m = _TAG.match(child.name)
            if m and (child / COMPLETE).exists():
                steps.append(int(m.group(1)))
    return sorted(steps)


def partial_tags(directory: Path) -> list[Path]:
    """Tag directories without the completion marker (saves that did not finish)."""
    if not directory.is_dir():
        return []
    return [c for c in directory.iterdir() if _TAG.match(c.name) and not (c / COMPLETE).exists()]


def prune(directory: Path, keep: int, *, partial: bool = False) -> list[str]:
    """Delete complete checkpoints older than the newest ``keep`` (and their universal copies);
    with ``partial`` also unfinished tags. Returns the deleted names (rank 0 only calls this)."""
    gone: list[str] = []
    steps = complete_steps(directory)
    old = steps[: max(0, len(steps) - max(keep, 1))]
    targets = [directory / tag_of(s) for s in old]
    if partial:
        targets += partial_tags(directory)
    for target in targets:
        for path in (target, target.with_name(target.name + UNIVERSAL_SUFFIX)):
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
                gone.append(path.name)
    return gone


def latest_step(directory: Path) -> int | None:
    """The step ``latest`` names when its tag is complete, else the newest complete tag."""
    named = directory / LATEST
    if named.exists():
        m = _TAG.match(named.read_text().strip())
        if m and (directory / m.group(0) / COMPLETE).exists():
            return int(m.group(1))
    steps = complete_steps(directory)
    return steps[-1] if steps else None


def universal_info(module: Any) -> dict[str, Any]:
    """DeepSpeed's universal-checkpoint metadata for the model's tensor-parallel slicing, saved
    with every checkpoint so a resume at another TP size merges and re-splits each parameter the
    way the model cut it: replicated on the TP group (norms, row-parallel biases), split along its
    inputs (row-parallel weights: dim 1), else along dim 0 (column-parallel, vocabulary)."""
    from deepspeed.checkpoint import constants

    replicated, rows = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue  # no optimizer state to merge; strict conversion refuses unused patterns
        split = getattr(param, "tp_split_dim", None)
        if split is None:
            replicated.append(f"^{re.escape(name)}$")
        elif split == 1:
            rows.append(f"^{re.escape(name)}$")
    return {
        constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        constants.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        constants.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: rows,
    }


def _merge_dim(info: dict[str, Any], name: str) -> int | None:
    """How the TP slices of parameter ``name`` merge: None (replicated: any one), else the dim."""
    from deepspeed.checkpoint import constants

    def listed(key: str) -> bool:
        return any(re.match(p, name) for p in info.get(key) or [])

    if listed(constants.TP_REPLICATED_PARAMETER_PATTERNS):
        return None
    return 1 if listed(constants.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS) else 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Cadence:
    """When to save: every ``every_steps`` steps and/or every ``every_minutes`` minutes."""

    every_steps: int = 0
    every_minutes: float = 0.0
    last_save: float = field(default_factory=time.monotonic)

    def due_locally(self, step: int, now: float) -> bool:
        by_steps = bool(self.every_steps and step % self.every_steps == 0)
        by_time = bool(self.every_minutes and now - self.last_save >= 60.0 * self.every_minutes)
        return by_steps or by_time


@dataclass
class Resume:
    """What the run resumes from."""

    step: int
    tag: str  # the tag DeepSpeed loads (the universal copy when the layout changed)
    saved_layout: dict[str, Any]
    universal: bool
    convert_seconds: float = 0.0


def conversion_refusal(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why the checkpoint written at ``saved`` cannot resume at ``current`` (None: it can)."""
    return capabilities.resume_refusal(saved, current)


def plan_resume(directory: Path, current: dict[str, Any]) -> Resume | None:
    """Rank 0: the checkpoint to resume from and whether it needs the universal form; a
    ContractError (InvalidCheckpoint) when it cannot be converted to the current layout."""
    step = latest_step(directory)
    if step is None:
        return None
    tag = tag_of(step)
    layout_path = directory / tag / LAYOUT_FILE
    saved = json.loads(layout_path.read_text()) if layout_path.exists() else dict(current)
    if same_sharding(saved, current) and saved.get("method", current.get("method")) == current.get("method"):
        return Resume(step=step, tag=tag, saved_layout=saved, universal=False)
    refusal = conversion_refusal(saved, current)
    if refusal is None and saved.get("tp") != current.get("tp") and not saved.get(TP_PATTERNS):
        refusal = (
            f"the latest checkpoint (tp {saved.get('tp')}) was written by a trainer that saved no TP "
            f"slicing patterns, so it cannot resume at tp {current.get('tp')}; resume at its TP"
        )
    if refusal is not None:
        raise contract.ContractError(f"{directory / tag}: {refusal}", contract.REASON_INVALID_CHECKPOINT)
    return Resume(step=step, tag=tag + UNIVERSAL_SUFFIX, saved_layout=saved, universal=True)


def convert_to_universal(directory: Path, step: int) -> float:
    """DeepSpeed's ds_to_universal of ``step<N>`` into ``step<N>-universal`` (once: a finished
    copy is reused); written to a temporary name and renamed, so a crash leaves no half copy."""
    out = directory / (tag_of(step) + UNIVERSAL_SUFFIX)
    if (out / COMPLETE).exists():
        return 0.0
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    start = time.perf_counter()
    tmp = directory / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = Namespace(
        input_folder=str(directory / tag_of(step)),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    if any((directory / tag_of(step)).glob("*optim_states.pt")):
        ds_to_universal.main(args)
        _complete_zero3_conversion(tmp)
    else:  # no ZeRO: ds_to_universal needs ZeRO optimizer files; the same layout, written here
        _universal_from_plain(directory / tag_of(step), tmp)
    _add_zero3_global_state(tmp)
    _alias_engine_state(tmp)
    (tmp / COMPLETE).write_text(f"{tag_of(step)}\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return time.perf_counter() - start


def _complete_zero3_conversion(out: Path) -> None:
    """Make a ZeRO-3 conversion what the ZeRO-1/2 and plain loaders read (DeepSpeed 0.19).

    ds_to_universal writes, for ZeRO-3 only: no per-parameter ``step.pt`` (ZeRO-3's optimizer
    keeps one step per flat sub-group, in ``zero/optimizer_state.pt``), flat tensors instead of
    the parameters' shapes, and no ``ds_version`` in the optimizer state. Only DeepSpeed's own
    ZeRO-3 loader copes: without the step, Adam restarted its bias correction at step 1 — the
    weights and moments resumed exactly, the updates did not (losses drifted by ~4e-2); without
    ``ds_version`` a ZeRO-1/2 engine refuses the checkpoint.
    """
    import deepspeed
    import torch

    zero_dir = out / "zero"
    global_state = zero_dir / "optimizer_state.pt"
    engine_states = sorted(out.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))
    if not global_state.exists() or not engine_states:
        return  # not a ZeRO-3 conversion
    saved = torch.load(global_state, map_location="cpu", weights_only=False)
    states = ((saved.get("optimizer_state_dict") or {}).get("state") or {}).values()
    steps = {float(s["step"]) for s in states if isinstance(s, dict) and "step" in s}
    if len(steps) != 1:
        raise RuntimeError(f"{global_state}: expected one Adam step for every ZeRO-3 sub-group, got {steps}")
    if not saved.get("ds_version"):
        saved["ds_version"] = deepspeed.__version__
        torch.save(saved, global_state)
    step = torch.as_tensor(steps.pop())
    shapes: dict[str, Any] = {}
    for group in (
        torch.load(engine_states[0], map_location="cpu", weights_only=False).get("param_shapes") or []
    ):
        shapes.update(group)
    for name, shape in shapes.items():
        folder = zero_dir / name
        if not (folder / "fp32.pt").exists():
            continue
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            path = folder / f"{key}.pt"
            if path.exists():
                loaded = torch.load(path, map_location="cpu", weights_only=False)
                value = loaded["param"] if isinstance(loaded, dict) else loaded
                torch.save({"param": value.reshape(shape), "cat_dim": 0}, path)
        if not (folder / "step.pt").exists():
            torch.save(step, folder / "step.pt")


def _add_zero3_global_state(out: Path) -> None:
    """Give a conversion of a ZeRO-0/1/2 checkpoint the global optimizer state DeepSpeed's ZeRO-3
    loader reads (``optimizer_state_dict``: the Adam step and the param groups), which the
    converter writes for ZeRO-3 sources only: a re-plan to a higher ZeRO stage (an out-of-memory)
    resumes too."""
    import torch

    global_state = out / "zero" / "optimizer_state.pt"
    if not global_state.exists():
        return
    saved = torch.load(global_state, map_location="cpu", weights_only=False)
    if saved.get("optimizer_state_dict"):
        return
    step_file = next((out / "zero").glob("*/step.pt"), None)
    if step_file is None:
        raise RuntimeError(f"{out}: no parameter has an Adam step (zero/<parameter>/step.pt)")
    step = torch.load(step_file, map_location="cpu", weights_only=False)
    saved["optimizer_state_dict"] = {
        "state": {0: {"step": step}},
        "param_groups": saved.get("param_groups") or [],
    }
    torch.save(saved, global_state)


def _alias_engine_state(out: Path) -> None:
    """Name the engine state of a universal checkpoint both ways DeepSpeed looks for it.

    The converter copies the source's model-states files as they are: ``mp_rank_NN_...`` from
    ZeRO-0/1/2, ``zero_pp_rank_D_mp_rank_NN_...`` from ZeRO-3; a universal load reads
    ``mp_rank_NN_...`` into a ZeRO-1/2 engine and ``zero_pp_rank_0_mp_rank_NN_...`` into a ZeRO-3
    one, so a ZeRO-3 checkpoint resumed at ZeRO-2 (or back) found no file. The alias keeps the
    engine state (steps, LR scheduler) without the module: a universal load takes the weights
    from ``zero/<parameter>/fp32.pt``, never from this file.
    """
    import torch

    for path in sorted(out.glob("*mp_rank_*_model_states.pt")):
        m = re.fullmatch(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt", path.name)
        if m is None or (m.group(1) not in (None, "0")):
            continue
        mp = m.group(2)
        other = (
            f"mp_rank_{mp}_model_states.pt" if m.group(1) else f"zero_pp_rank_0_mp_rank_{mp}_model_states.pt"
        )
        if (out / other).exists():
            continue
        saved = torch.load(path, map_location="cpu", weights_only=False)
        saved["module"] = {}
        torch.save(saved, out / other)


def _universal_from_plain(source: Path, out: Path) -> None:
    """Write DeepSpeed's universal layout (``zero/<parameter>/{fp32,exp_avg,exp_avg_sq,step}.pt``
    plus the engine state) from a checkpoint without ZeRO: one model-states file per TP rank, each
    holding that rank's slice of the weights and the torch optimizer's state (parameters in module
    order, trainable only); slices merge by the saved TP patterns (:func:`universal_info`)."""
    import torch
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    files = sorted(source.glob("mp_rank_*_model_states.pt"))
    if not files or any(not re.fullmatch(r"mp_rank_\d+_model_states\.pt", f.name) for f in files):
        raise RuntimeError(f"{source}: converting a checkpoint without ZeRO needs PP1 (mp_rank_NN files)")
    ranks = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    saved = ranks[0]
    info = saved.get(UNIVERSAL_CHECKPOINT_INFO) or {}
    if len(ranks) > 1 and not info.get("tp_replicated_parameter_patterns"):
        raise RuntimeError(f"{source}: a TP{len(ranks)} checkpoint without its TP patterns cannot merge")
    optims = [r.get("optimizer") or {} for r in ranks]
    ids = [i for group in optims[0].get("param_groups", []) for i in group["params"]]
    module = saved["module"]
    names = list(saved.get("param_shapes", [{}])[0]) if saved.get("param_shapes") else list(module)

    def merged(name: str, pieces: list[Any]) -> Any:
        # The dim is recorded at TP1 too: a resume at TP2 re-splits along it.
        dim = _merge_dim(info, name)
        return (pieces[0] if dim is None else torch.cat(pieces, dim=dim)).float(), dim or 0

    for name, pid in zip(names, ids, strict=False):
        folder = out / "zero" / name
        folder.mkdir(parents=True, exist_ok=True)
        value, dim = merged(name, [r["module"][name] for r in ranks])
        torch.save({"param": value, "cat_dim": dim}, folder / "fp32.pt")
        for key, first in (optims[0].get("state", {}).get(pid) or {}).items():
            if key == "step":
                torch.save(torch.as_tensor(float(first)), folder / "step.pt")  # as ds_to_universal
            else:
                value, dim = merged(name, [o["state"][pid][key] for o in optims])
                torch.save({"param": value, "cat_dim": dim}, folder / f"{key}.pt")
    import deepspeed

    # The optimizer's global state the ZeRO optimizers read before the per-parameter files.
    groups = optims[0].get("param_groups", [])
    torch.save(
        {"param_groups": groups, "ds_version": deepspeed.__version__}, out / "zero" / "optimizer_state.pt"
    )
    for path, state in zip(files, ranks, strict=True):
        state["optimizer"] = None
        torch.save(state, out / path.name)


def _load_universal_plain(engine: Any, universal: Path, original: Path) -> None:
    """Load a universal checkpoint into an engine without ZeRO: the weights, Adam moments and
    step of each parameter from its per-parameter files (full tensors keyed by name), the step
    counters and LR scheduler from the saved engine state."""
    import torch

    zero_dir = universal / "zero"
    states = sorted(universal.glob("*model_states.pt")) or sorted(original.glob("*model_states.pt"))
    if not states:
        raise RuntimeError(f"no engine state (*model_states.pt) in {universal} or {original}")
    saved = torch.load(states[0], map_location="cpu", weights_only=False)
    engine.global_steps = int(saved.get("global_steps", 0))
    engine.global_samples = int(saved.get("global_samples", 0))
    if engine.lr_scheduler is not None and saved.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    mpu = getattr(engine, "mpu", None)
    tp_rank = mpu.get_tensor_model_parallel_rank() if mpu is not None else 0
    tp_size = mpu.get_tensor_model_parallel_world_size() if mpu is not None else 1

    def own_slice(full: Any, cat_dim: int, param: Any) -> Any:
        # A full tensor saved at another TP size: this rank's slice, cut as the model cuts it.
        if full.numel() == param.numel() or tp_size == 1:
            return full
        return full.chunk(tp_size, dim=cat_dim)[tp_rank]

    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        folder = zero_dir / name
        if not folder.is_dir():
            raise RuntimeError(f"universal checkpoint {zero_dir.parent} has no state for parameter {name}")
        state: dict[str, Any] = {}
        for file in folder.glob("*.pt"):
            loaded = torch.load(file, map_location="cpu", weights_only=False)
            value = loaded["param"] if isinstance(loaded, dict) else loaded
            cat_dim = loaded.get("cat_dim", 0) if isinstance(loaded, dict) else 0
            state[file.stem] = value if file.stem == "step" else own_slice(value, int(cat_dim or 0), param)
        with torch.no_grad():
            param.copy_(state.pop("fp32").view_as(param).to(param.dtype))
        step = state.pop("step", 0)
        optimizer.state[param] = {
            "step": torch.as_tensor(float(step), dtype=torch.float32),
            **{k: v.view_as(param).to(param.device, torch.float32) for k, v in state.items()},
        }


class Checkpointer:
    """Saves and resumes one run's checkpoints (every rank holds one; rank 0 writes the markers)."""

    def __init__(
        self, directory: str, cadence: Cadence, *, keep: int, layout: Layout, rank: int, device: Any
    ) -> None:
        self.directory = Path(directory) if directory else None
        self.cadence = cadence
        self.keep = keep
        self.layout = layout_record(layout)
        self.rank = rank
        self.device = device
        self.last: dict[str, Any] | None = None  # the newest completed checkpoint (stats key)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def prepare_resume(self, ds_config: dict[str, Any]) -> Resume | None:
        """Before ``deepspeed.initialize``: find the checkpoint, convert it when the layout
        changed (rank 0; the others wait), switch the config to universal loading."""
        import torch.distributed as dist

        if self.directory is None:
            return None
        box: list[Any] = [None]
        if self.rank == 0:
            for name in prune(self.directory, keep=1 << 30, partial=True):
                log.warning("deleted unfinished checkpoint %s", name)
            found: Resume | str | None
            try:
                found = plan_resume(self.directory, self.layout)
            except contract.ContractError as exc:
                found = str(exc)  # every rank fails with it, none waits for rank 0 forever
            if isinstance(found, Resume) and found.universal:
                found.convert_seconds = convert_to_universal(self.directory, found.step)
            box = [found]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], str):
            raise contract.ContractError(box[0], contract.REASON_INVALID_CHECKPOINT)
        resume = box[0]
        # DeepSpeed loads universal checkpoints into its ZeRO optimizers only; without ZeRO the
        # module comes from the original tag and the optimizer states from the universal copy.
        if resume is not None and resume.universal and self.layout["zero_stage"] > 0:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        return resume

    def load(self, engine: Any, resume: Resume) -> None:
        assert self.directory is not None
        if resume.universal and self.layout["zero_stage"] == 0:
            _load_universal_plain(
                engine,
                self.directory / resume.tag,
                self.directory / resume.tag.removesuffix(UNIVERSAL_SUFFIX),
            )
            return
        path, _ = engine.load_checkpoint(str(self.directory), tag=resume.tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint at {self.directory / resume.tag}")

    def due(self, step: int) -> bool:
        """Whether to save after ``step``: rank 0's decision, the same on every rank."""
        if self.directory is None:
            return False
        if not self.cadence.every_minutes:  # steps only: every rank computes the same answer
            return self.cadence.due_locally(step, 0.0)
        import torch
        import torch.distributed as dist

        local = self.cadence.due_locally(step, time.monotonic())
        flag = torch.tensor([1 if local else 0], device=self.device)
        if dist.get_world_size() > 1:
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def save(self, engine: Any, step: int) -> dict[str, Any]:
        """Every rank writes its shards; after a barrier rank 0 marks the tag complete, moves
        ``latest`` and prunes. Returns the checkpoint record (stats key ``checkpoint``)."""
        import torch.distributed as dist

        assert self.directory is not None
        start = time.perf_counter()
        tag = tag_of(step)
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

        client_state = {"step": step, UNIVERSAL_CHECKPOINT_INFO: universal_info(engine.module)}
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        if dist.get_world_size() > 1:
            dist.barrier()
        path = self.directory / tag
        if self.rank == 0:
            # TP_PATTERNS: the save carries the TP slicing patterns a resume at another TP needs.
            _write_atomic(path / LAYOUT_FILE, json.dumps({**self.layout, TP_PATTERNS: True}, sort_keys=True))
            _write_atomic(path / COMPLETE, f"{tag}\n")
            _write_atomic(self.directory / LATEST, tag)
            prune(self.directory, self.keep)
        if dist.get_world_size() > 1:
            dist.barrier()  # no rank reports a checkpoint before ``latest`` names it
        self.cadence.last_save = time.monotonic()
        self.last = {
            "step": step,
            "time": time.time(),
            "path": str(path),
            "layout": dict(self.layout),
            "seconds": time.perf_counter() - start,
        }
        return self.last
