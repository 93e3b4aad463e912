"""What one rank measures: model-state bytes it holds, device memory, process memory.

Model states (``parameters``, ``gradients``, ``optimizer_states``) are counted from the tensors
themselves, each STORAGE once (views into DeepSpeed's flat buffers share a storage):

* parameters: every module parameter's storage; under ZeRO-3 the partition ``param.ds_tensor``
  this rank keeps (the gathered ``param.data`` is empty between uses); a 4-bit QLoRA weight adds
  its quantisation constants.
* gradients: ``param.grad`` plus the gradient partitions DeepSpeed's ZeRO optimizers keep
  (``grads_in_partition`` / ``averaged_gradients`` for ZeRO-2, ``grad_partitions_flat_buffer``
  for ZeRO-3, the fp32 partitions' ``.grad``). Communication buckets (``ipg`` buffers) are
  scratch, not model state, and are not counted.
* optimizer_states: the base optimizer's ``state`` tensors (Adam moments, step) plus the fp32
  master partitions ZeRO keeps (``single_partition_of_fp32_groups`` for ZeRO-1/2,
  ``fp32_partitioned_groups_flat`` for ZeRO-3, ``fp32_groups_flat_partition`` for the bf16
  optimizer) when they are not the parameters' own storage.

They are measured just before each optimizer step (gradients complete, states allocated); the
reported figure is the largest total seen.

The device seam: :class:`CpuDevice` (process RSS, peak RSS) and :class:`CudaDevice`
(``torch.cuda`` peak allocated / reserved, device total / used from ``mem_get_info``); the GPU
one is only constructed when CUDA is available.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil
import torch
from torch import nn

GRAD_ATTRS = (
    "grads_in_partition",
    "averaged_gradients",
    "grad_partitions_flat_buffer",
    "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
    "fp32_groups_gradients_flat",
)
MASTER_ATTRS = (
    "single_partition_of_fp32_groups",
    "fp32_partitioned_groups_flat",
    "fp32_groups_flat_partition",
)


def _tensors(obj: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif depth < 3 and isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v, depth + 1)


@dataclass
class ModelStateBytes:
    """Bytes of model-state tensors this rank holds."""

    parameters: int = 0
    gradients: int = 0
    optimizer_states: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states


@dataclass
class _Counter:
    seen: set[int] = field(default_factory=set)

    def add(self, tensors: Iterable[torch.Tensor]) -> int:
        total = 0
        for t in tensors:
            if t.numel() == 0:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.seen:
                continue
            self.seen.add(key)
            total += storage.nbytes()
        return total


def _held(p: torch.Tensor) -> torch.Tensor:
    """The tensor a parameter really occupies: its ZeRO-3 partition, else its data."""
    ds_tensor: torch.Tensor | None = getattr(p, "ds_tensor", None)
    return p.data if ds_tensor is None else ds_tensor


def _quant_state_tensors(params: list[torch.Tensor]) -> Iterable[torch.Tensor]:
    """A 4-bit (bitsandbytes) weight's block constants: the absmax per block and, with double
    quantisation, the second level's absmax and offset — part of the QLoRA base's bytes. The
    quantisation code tables (16 and 256 values per matrix, whatever its size) are left out: they
    do not scale with the parameters, which is what the plan counts."""
    for p in params:
        state = getattr(p, "quant_state", None)
        if state is None:
            continue
        if isinstance(getattr(state, "absmax", None), torch.Tensor):
            yield state.absmax
        nested = getattr(state, "state2", None)
        if nested is not None and isinstance(getattr(nested, "absmax", None), torch.Tensor):
            yield nested.absmax
        offset = getattr(state, "offset", None)
        if isinstance(offset, torch.Tensor):
            yield offset


def measure_model_states(module: nn.Module, optimizer: Any) -> ModelStateBytes:
    """Count this rank's parameter, gradient and optimizer-state bytes (see module doc)."""
    c = _Counter()
    params = list(module.parameters())
    out = ModelStateBytes()
    out.parameters = c.add(_held(p) for p in params) + c.add(_quant_state_tensors(params))

    grads: list[torch.Tensor] = [p.grad for p in params if p.grad is not None]
    for p in params:
        ds = getattr(p, "ds_tensor", None)
        if ds is not None and ds.grad is not None:
            grads.append(ds.grad)
    for name in GRAD_ATTRS:
        grads += list(_tensors(getattr(optimizer, name, None)))
    for name in MASTER_ATTRS:
        grads += [t.grad for t in _tensors(getattr(optimizer, name, None)) if t.grad is not None]
    out.gradients = c.add(grads)

    masters: list[torch.Tensor] = []
    for name in MASTER_ATTRS:
        masters += list(_tensors(getattr(optimizer, name, None)))
    base = getattr(optimizer, "optimizer", optimizer)
    states: list[torch.Tensor] = []
    for st in getattr(base, "state", {}).values():
        states += list(_tensors(st))
    out.optimizer_states = c.add(masters) + c.add(states)
    return out


class StateMeter:
    """Samples model states after backward passes and right before optimizer steps.

    The two points bracket the step: after backward the (not yet reduced) gradients are all
    there; before the optimizer step the ZeRO partitions and the optimizer states are. ``peak``
    is the sample with the largest total. The states reach their steady size within the first
    optimizer steps (the optimizer allocates its states lazily at the first), so the meter samples
    every pass of the first ``warm_steps`` optimizer steps and then one step in ``every``: walking
    every tensor of a large model on each micro-step costs what a small model's step does.
    """

    def __init__(self, engine: Any, *, warm_steps: int = 3, every: int = 50) -> None:
        self.module, self.optimizer = engine.module, engine.optimizer
        self.last = ModelStateBytes()
        self.peak = ModelStateBytes()
        self.seconds = 0.0  # time spent sampling (the trainer's own overhead)
        self.optimizer_steps = 0
        self._warm_steps, self._every = warm_steps, max(1, every)
        original_step: Callable[..., Any] = self.optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            self.sample()
            self.optimizer_steps += 1
            return original_step(*args, **kwargs)

        self.optimizer.step = step
        # The pipeline engine runs its backward passes from a class-level instruction map
        # (``_INSTRUCTION_MAP[BackwardPass]``, bound per call): give this engine its own map.
        imap = getattr(engine, "_INSTRUCTION_MAP", None)
        if imap is not None:
            from deepspeed.runtime.pipe import schedule  # noqa: PLC0415 - pipeline runs only

            original_bwd = imap[schedule.BackwardPass]

            def backward_pass(eng: Any, *args: Any, **kwargs: Any) -> Any:
                out = original_bwd(eng, *args, **kwargs)
                self.sample()
                return out

            engine._INSTRUCTION_MAP = {**imap, schedule.BackwardPass: backward_pass}

    @property
    def due(self) -> bool:
        """Whether this optimizer step is one the meter samples."""
        n = self.optimizer_steps
        return n < self._warm_steps or n % self._every == 0

    def sample(self) -> None:
        """Measure now, if this step is due; keep the largest total."""
        if not self.due:
            return
        t0 = time.perf_counter()
        self.last = measure_model_states(self.module, self.optimizer)
        self.seconds += time.perf_counter() - t0
        if self.last.total >= self.peak.total:
            self.peak = self.last


class Device(Protocol):
    """The memory figures of the device a rank runs on (the GPU-only seam)."""

    name: str

    def memory(self) -> dict[str, int]:
        """``kind -> bytes`` for the ``shardwise_trainer_memory_bytes`` metric."""
        ...

    def peak_bytes(self) -> int:
        """The ``peak_memory_bytes`` of the final per-rank JSON line."""
        ...


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


class CpuDevice:
    """CPU: process RSS now and its peak (``ru_maxrss``)."""

    name = "cpu"

    def __init__(self) -> None:
        self._proc = psutil.Process()

    def memory(self) -> dict[str, int]:
        return {"rss": int(self._proc.memory_info().rss), "peak_rss": _peak_rss()}

    def peak_bytes(self) -> int:
        return _peak_rss()


class CudaDevice:
    """CUDA: ``torch.cuda`` peak allocated / reserved, device total / used, plus process RSS."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = str(index)
        self._cpu = CpuDevice()

    def memory(self) -> dict[str, int]:
        free, total = torch.cuda.mem_get_info(self.index)
        return {
            "peak_allocated": int(torch.cuda.max_memory_allocated(self.index)),
            "peak_reserved": int(torch.cuda.max_memory_reserved(self.index)),
            "allocated": int(torch.cuda.memory_allocated(self.index)),
            "device_total": int(total),
            "device_used": int(total - free),
            "rss": self._cpu.memory()["rss"],
        }

    def peak_bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.index))


def device_for(local_rank: int) -> Device:
    """The CUDA seam when a GPU is visible, else the CPU one."""
    if torch.cuda.is_available():
        return CudaDevice(local_rank)
    return CpuDevice()
