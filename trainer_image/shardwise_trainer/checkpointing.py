"""Checkpoints of the run: a cadence all ranks agree on, atomic tags, keep-K pruning, resume across layouts.

On disk, in the checkpoint directory::

    latest                     the tag of the newest COMPLETE checkpoint (written by rename)
    step8/                     DeepSpeed's files of one save, plus
    step8/shardwise-layout.json  the layout that wrote it (tp, pp, dp, zero stage, method) and
                                 whether the save carries the TP slicing patterns and
                                 parameter names a conversion across TP / PP needs
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
from typing import TYPE_CHECKING, Any

from shardwise_trainer import capabilities, contract
from shardwise_trainer.contract import Layout

if TYPE_CHECKING:
    from shardwise_trainer.model import PipelineNames
from shardwise_trainer.universal import (
    COMPLETE,
    PARAMETER_NAMES,
    UNIVERSAL_SUFFIX,
    convert_to_universal,
    load_universal_plain,
    tag_of,
    universal_info,
)

log = logging.getLogger("shardwise_trainer.checkpointing")

LATEST = "latest"
LAYOUT_FILE = "shardwise-layout.json"
SHARDING_METADATA = "sharding_metadata"
_TAG = re.compile(r"^step(\d+)$")


def layout_record(layout: Layout) -> dict[str, Any]:
    """The layout facts a checkpoint's shards depend on (what must match to load it as is)."""
    return {
        "tp": layout.tp,
        "pp": layout.pp,
        "dp": layout.dp,
        "zero_stage": layout.zero_stage,
        "method": layout.method,
        **({"sp": layout.sp} if layout.sp > 1 else {}),  # absent = 1, as in older checkpoints
    }


def same_sharding(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    return all(saved.get(k) == current.get(k) for k in ("tp", "pp", "dp", "zero_stage")) and saved.get(
        "sp", 1
    ) == current.get("sp", 1)


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
    refusal = capabilities.resume_refusal(saved, current)
    moved = [k for k in ("tp", "pp") if saved.get(k, 1) != current.get(k, 1)]
    if refusal is None and moved and not saved.get(SHARDING_METADATA):
        refusal = (
            f"the latest checkpoint ({', '.join(f'{k} {saved.get(k, 1)}' for k in moved)}) was written by a "
            "trainer that saved no TP slicing patterns or parameter names, so it cannot resume at "
            f"{', '.join(f'{k} {current.get(k, 1)}' for k in moved)}; resume at its TP and PP"
        )
    if refusal is not None:
        raise contract.ContractError(f"{directory / tag}: {refusal}", contract.REASON_INVALID_CHECKPOINT)
    return Resume(step=step, tag=tag + UNIVERSAL_SUFFIX, saved_layout=saved, universal=True)


class Checkpointer:
    """Saves and resumes one run's checkpoints (every rank holds one; rank 0 writes the markers)."""

    def __init__(
        self,
        directory: str,
        cadence: Cadence,
        *,
        keep: int,
        layout: Layout,
        rank: int,
        device: Any,
        names: PipelineNames | None = None,
    ) -> None:
        self.directory = Path(directory) if directory else None
        self.names = names  # the built-in model's: conversions across pipeline depths
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
                found.convert_seconds = convert_to_universal(self.directory, found.step, self.names)
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
            load_universal_plain(
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

        client_state = {
            "step": step,
            UNIVERSAL_CHECKPOINT_INFO: universal_info(engine.module),
            PARAMETER_NAMES: [n for n, p in engine.module.named_parameters() if p.requires_grad],
        }
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        if dist.get_world_size() > 1:
            dist.barrier()
        path = self.directory / tag
        if self.rank == 0:
            # The save carries the TP patterns and parameter names a resume at another TP / PP needs.
            record = {**self.layout, SHARDING_METADATA: True}
            _write_atomic(path / LAYOUT_FILE, json.dumps(record, sort_keys=True))
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
