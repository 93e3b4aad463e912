"""DeepSpeed universal checkpoints: the conversion of every layout the trainer saves into one
layout-independent form (per-parameter full tensors), and loading it into every layout it runs.

``ds_to_universal`` does the ZeRO-1/2/3 conversions; the trainer adds what DeepSpeed 0.19 leaves
out of them, converts checkpoints without ZeRO itself, and saves the model's TP slicing patterns
with every checkpoint so TP slices merge and re-split (:func:`universal_info`).
"""

# ruff: noqa: PLC0415 - torch / DeepSpeed are imported by train.py before these run
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardwise_trainer.model import PipelineNames

COMPLETE = "shardwise-complete"
UNIVERSAL_SUFFIX = "-universal"


def tag_of(step: int) -> str:
    """The tag (directory name) of the checkpoint saved after ``step``."""
    return f"step{step}"


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


#: The client-state key of a save: this rank's trainable parameter names, in the optimizer's order.
PARAMETER_NAMES = "shardwise_parameter_names"


def convert_to_universal(directory: Path, step: int, names: PipelineNames | None = None) -> float:
    """DeepSpeed's ds_to_universal of ``step<N>`` into ``step<N>-universal`` (once: a finished
    copy is reused); written to a temporary name and renamed, so a crash leaves no half copy.

    With ``names`` (the built-in model) the per-parameter folders get the plain model's names and
    the pipeline's names as aliases, so one copy loads at any pipeline depth."""
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
    source = directory / tag_of(step)
    if any(source.glob("*optim_states.pt")):
        ds_to_universal.main(args)
        _complete_zero3_conversion(tmp)
    elif any(source.glob("layer_*-model_states.pt")):  # a pipeline without ZeRO
        if names is None:
            raise RuntimeError(f"{source}: a pipeline checkpoint converts for the built-in model only")
        _universal_from_pipeline_plain(source, tmp, names)
    else:  # no ZeRO: ds_to_universal needs ZeRO optimizer files; the same layout, written here
        _universal_from_plain(source, tmp)
    if names is not None:
        _name_plainly(tmp / "zero", names)
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
    from deepspeed.checkpoint.constants import TP_REPLICATED_PARAMETER_PATTERNS, UNIVERSAL_CHECKPOINT_INFO

    files = sorted(source.glob("mp_rank_*_model_states.pt"))
    if not files or any(not re.fullmatch(r"mp_rank_\d+_model_states\.pt", f.name) for f in files):
        raise RuntimeError(f"{source}: converting a checkpoint without ZeRO needs PP1 (mp_rank_NN files)")
    ranks = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    saved = ranks[0]
    info = saved.get(UNIVERSAL_CHECKPOINT_INFO) or {}
    if len(ranks) > 1 and not info.get(TP_REPLICATED_PARAMETER_PATTERNS):
        raise RuntimeError(f"{source}: a TP{len(ranks)} checkpoint without its TP patterns cannot merge")
    optims = [r.get("optimizer") or {} for r in ranks]
    ids = [i for group in optims[0].get("param_groups", []) for i in group["params"]]
    module = saved["module"]
    names = list(saved.get("param_shapes", [{}])[0]) if saved.get("param_shapes") else list(module)

    def merged(pieces: list[Any], dim: int | None) -> Any:
        return pieces[0] if dim is None else torch.cat(pieces, dim=dim)

    for name, pid in zip(names, ids, strict=False):
        # The dim is recorded at TP1 too: a resume at TP2 re-splits along it.
        dim = _merge_dim(info, name)
        state = optims[0].get("state", {}).get(pid) or {}
        tensors = {"fp32": merged([r["module"][name] for r in ranks], dim)}
        tensors |= {k: merged([o["state"][pid][k] for o in optims], dim) for k in state if k != "step"}
        _save_parameter(out / "zero" / name, tensors, state.get("step"), cat_dim=dim or 0)
    _save_optimizer_groups(out / "zero", optims[0].get("param_groups", []))
    for path, engine_state in zip(files, ranks, strict=True):
        engine_state["optimizer"] = None
        torch.save(engine_state, out / path.name)


def _save_parameter(folder: Path, tensors: dict[str, Any], step: Any, *, cat_dim: int) -> None:
    """One parameter's universal files, as ds_to_universal writes them: ``fp32.pt`` and one file
    per Adam moment (full fp32 tensors with the dim they merge and re-split along), ``step.pt``."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    for key, value in tensors.items():
        torch.save({"param": value.float(), "cat_dim": cat_dim}, folder / f"{key}.pt")
    if step is not None:
        torch.save(torch.as_tensor(float(step)), folder / "step.pt")


def _save_optimizer_groups(zero_dir: Path, groups: list[Any]) -> None:
    """The optimizer's global state the ZeRO optimizers read before the per-parameter files."""
    import deepspeed
    import torch

    torch.save({"param_groups": groups, "ds_version": deepspeed.__version__}, zero_dir / "optimizer_state.pt")


def _name_plainly(zero_dir: Path, names: PipelineNames) -> None:
    """Rename pipeline-named parameter folders (``3.q.weight``) to the plain model's names
    (``layers.2.q.weight``) and alias every plain folder by its pipeline name, so a plain model
    and a pipeline of any depth (global spec indices, not per-stage) find their parameters."""
    for folder in sorted(p for p in zero_dir.iterdir() if p.is_dir() and not p.is_symlink()):
        plain = names.plain(folder.name)
        if plain == folder.name:
            continue
        if (zero_dir / plain).exists():
            shutil.rmtree(folder)  # the tied embedding's copy on the last stage: the same tensor
        else:
            folder.rename(zero_dir / plain)
    for folder in sorted(p for p in zero_dir.iterdir() if p.is_dir() and not p.is_symlink()):
        alias = zero_dir / names.pipeline(folder.name)
        if alias.name == folder.name or alias.exists():
            continue
        try:
            alias.symlink_to(folder.name, target_is_directory=True)
        except OSError:  # a volume without symlinks: a copy costs space, not correctness
            shutil.copytree(folder, alias)


def _universal_from_pipeline_plain(source: Path, out: Path, names: PipelineNames) -> None:
    """The universal layout of a pipeline checkpoint without ZeRO (TP1): weights from the
    per-layer files, each stage's torch optimizer state from its model-states file, matched to
    parameters by the names the save recorded in the optimizer's order (PARAMETER_NAMES)."""
    import torch

    weights: dict[str, Any] = {}
    for path in sorted(source.glob("layer_*-model_states.pt")):
        m = re.fullmatch(r"layer_(\d+)-model_(\d+)-model_states\.pt", path.name)
        if m is None or m.group(2) != "00":
            raise RuntimeError(f"{source}: converting a pipeline checkpoint needs TP1 ({path.name})")
        for key, tensor in torch.load(path, map_location="cpu", weights_only=False).items():
            weights.setdefault(names.of_layer_file(int(m.group(1)), key), tensor)
    stages = sorted(source.glob("mp_rank_*_model_states.pt"))
    groups: list[Any] = []
    written: set[str] = set()
    for path in stages:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        order = saved.get(PARAMETER_NAMES)
        if order is None:
            raise RuntimeError(f"{path}: saved without {PARAMETER_NAMES}; it cannot convert")
        optim = saved.get("optimizer") or {}
        ids = [i for group in optim.get("param_groups", []) for i in group["params"]]
        groups = groups or optim.get("param_groups", [])
        for name, pid in zip(order, ids, strict=True):
            plain = names.plain(name)
            if plain in written:
                continue  # the tied embedding's copy: the same updates as the first stage's
            written.add(plain)
            state = optim.get("state", {}).get(pid) or {}
            tensors = {"fp32": weights[plain], **{k: v for k, v in state.items() if k != "step"}}
            _save_parameter(out / "zero" / plain, tensors, state.get("step"), cat_dim=0)
        saved["optimizer"] = None
        torch.save(saved, out / path.name)
    _save_optimizer_groups(out / "zero", groups)


def load_universal_plain(engine: Any, universal: Path, original: Path) -> None:
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
    tensor = mpu is not None and hasattr(mpu, "get_tensor_model_parallel_rank")  # not Ulysses' mpu
    tp_rank = mpu.get_tensor_model_parallel_rank() if tensor else 0
    tp_size = mpu.get_tensor_model_parallel_world_size() if tensor else 1

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
