"""What a failed run tells the operator: its exit code, a CamelCase reason and whether a retry can help.

torchrun exits 1 whenever a worker fails, so the worker that failed says why in the pod's
termination message (contract.termination_message). The classification follows what a retry of
the same layout can change: a lost peer, a timed-out collective or a device fault may not recur on
a new attempt (retryable, exit 75); running out of memory recurs on the same layout, so it is
reported with the measured peak and what would lower it, not retried; anything else is the
program's own error (exit 1). Bad input (ContractError, exit 2) is handled before this module.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Final

from shardwise_trainer import contract

# Messages of communication failures that reach Python as RuntimeError / OSError (gloo, NCCL, the
# c10d store) rather than as torch.distributed's own DistError classes.
_COMMUNICATION: Final = re.compile(
    r"connection (reset|closed|refused)|broken pipe|timed? ?out|nccl|gloo|processgroup|"
    r"socket|peer|c10d|rendezvous|watchdog",
    re.IGNORECASE,
)
_DEVICE: Final = re.compile(r"cuda error|cublas|cudnn|ecc error|uncorrectable|xid|device lost", re.IGNORECASE)
# A device-side assert is the program indexing out of range: retrying cannot help.
_PROGRAM_ON_DEVICE: Final = re.compile(r"device-side assert", re.IGNORECASE)
_MAX_MESSAGE: Final = 600
# torch's out-of-memory message: "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; ...".
_TRIED: Final = re.compile(r"tried to allocate (\d+(?:\.\d+)?) ?(B|KiB|MiB|GiB|TiB)", re.IGNORECASE)
_UNITS: Final = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Failure:
    """How the run ended: the code to exit with, the reason, one line, and whether to retry."""

    exit_code: int
    reason: str
    message: str
    retryable: bool
    gpu_memory_needed: int | None = None  # GpuOutOfMemory on a GPU: peak + the failed allocation

    def termination_message(self) -> str:
        return contract.termination_message(
            self.exit_code,
            self.reason,
            self.message,
            retryable=self.retryable,
            gpu_memory_needed=self.gpu_memory_needed,
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:_MAX_MESSAGE]


def _torch_class(module: str, name: str) -> type[BaseException] | None:
    """A torch exception class, without importing torch when the run never got that far."""
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) and issubclass(cls, BaseException) else None


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes / contexts (DeepSpeed often wraps the original)."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 8:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def failed_allocation(text: str) -> int:
    """Bytes of the allocation an out-of-memory message says failed (0 when it names none)."""
    match = _TRIED.search(text)
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()]) if match else 0


def classify(
    exc: BaseException, *, rank: int | None = None, peak: str = "", gpu_peak_bytes: int | None = None
) -> Failure:
    """The failure ``exc`` stands for; ``peak`` describes the measured memory peak (for OOM) and
    ``gpu_peak_bytes`` is the GPU allocator's peak (None without a GPU)."""
    where = f"rank {rank}: " if rank is not None else ""
    oom = _torch_class("torch", "OutOfMemoryError")
    dist_error = _torch_class("torch.distributed", "DistError")
    for err in _chain(exc):
        if oom is not None and isinstance(err, oom):
            return Failure(
                contract.EXIT_PROGRAM_ERROR,
                contract.REASON_GPU_OUT_OF_MEMORY,
                f"{where}{_first_line(err)}{f' (measured peak {peak})' if peak else ''}; the same layout "
                "runs out again: raise the ZeRO stage, checkpoint more activations, lower the "
                "micro-batch or offload (the operator re-plans once with the measured peak)",
                retryable=False,
                gpu_memory_needed=None
                if gpu_peak_bytes is None
                else gpu_peak_bytes + failed_allocation(str(err)),
            )
        if isinstance(err, MemoryError):
            return Failure(
                contract.EXIT_PROGRAM_ERROR,
                contract.REASON_HOST_OUT_OF_MEMORY,
                f"{where}{_first_line(err)}{f' (peak {peak})' if peak else ''}; host memory ran out",
                retryable=False,
            )
    for err in _chain(exc):
        temporary = _temporary_reason(err, dist_error)
        if temporary is not None:
            return Failure(contract.EXIT_TEMPORARY, temporary, where + _first_line(err), retryable=True)
    return Failure(
        contract.EXIT_PROGRAM_ERROR, contract.REASON_TRAINER_ERROR, where + _first_line(exc), retryable=False
    )


def _temporary_reason(err: BaseException, dist_error: type[BaseException] | None) -> str | None:
    """CommunicationError / DeviceError when a new attempt may not meet ``err`` again, else None."""
    if isinstance(err, ConnectionError | TimeoutError):
        return contract.REASON_COMMUNICATION
    if dist_error is not None and isinstance(err, dist_error):
        return contract.REASON_COMMUNICATION
    text = str(err)
    if not isinstance(err, RuntimeError | OSError) or _PROGRAM_ON_DEVICE.search(text):
        return None
    if _DEVICE.search(text):
        return contract.REASON_DEVICE
    if _COMMUNICATION.search(text):
        return contract.REASON_COMMUNICATION
    return None


def gpu_peak_bytes() -> int | None:
    """The CUDA allocator's peak of this process, None when no GPU was in use."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated(torch.cuda.current_device()))
    return None


def measured_peak() -> str:
    """This process's memory peak, for the out-of-memory message: the CUDA allocator's peak when
    a GPU was in use, else the process's peak RSS."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        index = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        peak = torch.cuda.max_memory_allocated(index)
        return f"{peak / 2**30:.2f} GiB allocated of {total / 2**30:.2f} GiB"
    import resource  # noqa: PLC0415 - POSIX only, like the trainer

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"{rss / 2**30:.2f} GiB host RSS"


@dataclass(frozen=True)
class Fault:
    """The test-only fault switch (contract.ENV_TEST_FAULT): raise ``kind`` on ``rank`` at ``step``."""

    kind: str
    rank: int
    step: int

    def maybe_raise(self, rank: int, step: int) -> None:
        if rank != self.rank or step != self.step:
            return
        import torch  # noqa: PLC0415 - only a run that reaches its steps gets here

        if self.kind == "oom":
            raise torch.OutOfMemoryError(
                f"injected: tried to allocate 2.00 GiB on rank {rank} at step {step} "
                f"({contract.ENV_TEST_FAULT})"
            )
        raise torch.distributed.DistNetworkError(
            f"injected: connection reset by peer on rank {rank} at step {step} ({contract.ENV_TEST_FAULT})"
        )


def parse_fault(value: str | None) -> Fault | None:
    """``oom@1:3`` → Fault("oom", 1, 3); None when unset; ContractError when malformed."""
    if not value:
        return None
    match = re.fullmatch(r"(oom|comm)@(\d+):(\d+)", value.strip())
    if not match:
        raise contract.ContractError(
            f"{contract.ENV_TEST_FAULT}={value!r}: expected <oom|comm>@<rank>:<step>, e.g. oom@1:3"
        )
    return Fault(match.group(1), int(match.group(2)), int(match.group(3)))
