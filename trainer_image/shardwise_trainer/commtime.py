"""A rank's per-step compute vs communication time, from timed torch.distributed calls."""

# ruff: noqa: PLC0415  (torch is imported lazily: the module is imported by pure code paths too)
from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

#: The communication functions wrapped where present (names of torch 2.x; absent ones skipped).
COLLECTIVES: tuple[str, ...] = (
    "all_reduce",
    "all_reduce_coalesced",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_coalesced",
    "_all_gather_base_coalesced",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "monitored_barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "send_object_list",
    "recv_object_list",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "all_to_all",
    "all_to_all_single",
)
#: Context managers whose whole block is communication (the queued ops run on exit).
CONTEXT_COLLECTIVES: tuple[str, ...] = ("_coalescing_manager",)
_MARK = "__shardwise_commtime__"


class CommTimer:
    """Seconds spent inside communication calls, accumulated over the process's life."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._total = 0.0
        self.calls = 0

    @property
    def total(self) -> float:
        return self._total

    def _enter(self) -> int:
        local = self._local
        depth = getattr(local, "depth", 0)
        local.depth = depth + 1
        return int(depth)

    def _leave(self, depth: int, t0: float) -> None:
        elapsed = time.perf_counter() - t0
        self._local.depth = depth
        if depth == 0:  # a call made by another timed call is already counted by it
            with self._lock:
                self._total += elapsed
                self.calls += 1

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """Count the block's time, unless it runs inside another timed block of this thread."""
        depth = self._enter()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._leave(depth, t0)

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed; a returned ``Work`` (or list of them) has its ``wait()`` timed too."""

        # Inlined rather than ``with self.timing()``: a generator context manager costs
        # microseconds, and collectives are called hundreds of times per step.
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = self._enter()
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                self._leave(depth, t0)
            return _wrap_work(self, out)

        setattr(timed, _MARK, fn)
        return timed

    def wrap_context(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """A context-manager factory whose blocks are timed from enter to exit."""

        @functools.wraps(fn)
        @contextlib.contextmanager
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with self.timing(), fn(*args, **kwargs) as value:
                # ``cm.wait()`` of an async coalesced block is where it waits: timed too.
                yield TimedWork(self, value) if callable(getattr(value, "wait", None)) else value

        setattr(timed, _MARK, fn)
        return timed


class TimedWork:
    """A ``torch.distributed.Work`` whose ``wait()`` counts as communication time."""

    __slots__ = ("_timer", "_work")

    def __init__(self, timer: CommTimer, work: Any) -> None:
        self._timer = timer
        self._work = work

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        depth = self._timer._enter()
        t0 = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._timer._leave(depth, t0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _is_work(value: Any) -> bool:
    return callable(getattr(value, "wait", None)) and hasattr(value, "is_completed")


def _wrap_work(timer: CommTimer, out: Any) -> Any:
    if out is None or isinstance(out, TimedWork):
        return out
    if _is_work(out):
        return TimedWork(timer, out)
    if isinstance(out, list) and out and all(_is_work(w) for w in out):
        return [TimedWork(timer, w) for w in out]
    return out


_installed: CommTimer | None = None
_install_lock = threading.Lock()


def install() -> CommTimer:
    """Wrap ``torch.distributed``'s communication functions (idempotent); the process's timer.

    Call it before ``deepspeed.init_distributed``: DeepSpeed's comm backend keeps references to
    ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` from then on. Both namespaces are
    patched because DeepSpeed reaches into ``distributed_c10d`` for the ``_base`` and
    ``_coalescing_manager`` variants.
    """
    global _installed  # noqa: PLW0603  (one set of wrappers per process, whoever asks first)
    with _install_lock:
        if _installed is not None:
            return _installed
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        timer = CommTimer()
        wrapped: dict[int, Callable[..., Any]] = {}  # one wrapper per original function
        for module in (dist, c10d):
            for names, wrap in ((COLLECTIVES, timer.wrap), (CONTEXT_COLLECTIVES, timer.wrap_context)):
                for name in names:
                    fn = getattr(module, name, None)
                    if fn is None or hasattr(fn, _MARK):
                        continue
                    if id(fn) not in wrapped:
                        wrapped[id(fn)] = wrap(fn)
                    setattr(module, name, wrapped[id(fn)])
        _installed = timer
        return timer


def uninstall() -> None:
    """Put the original functions back (tests)."""
    global _installed  # noqa: PLW0603
    with _install_lock:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for module in (dist, c10d):
            for name in (*COLLECTIVES, *CONTEXT_COLLECTIVES):
                fn = getattr(module, name, None)
                original = getattr(fn, _MARK, None)
                if original is not None:
                    setattr(module, name, original)
        _installed = None


# --------------------------------------------------------------------------- per-step clocks


@dataclass(frozen=True, slots=True)
class StepTimes:
    """One optimizer step of one rank, seconds: wall = compute + communication."""

    step_seconds: float
    compute_seconds: float
    communication_seconds: float


class StepClock(Protocol):
    """Splits a step's wall time into compute and communication."""

    def begin_step(self) -> None: ...

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]: ...

    def end_step(self) -> StepTimes: ...


class CommTimerClock:
    """CPU (and any synchronous backend): compute = wall time - time inside collectives."""

    def __init__(self, timer: CommTimer) -> None:
        self.timer = timer
        self._t0 = 0.0
        self._comm0 = 0.0

    def begin_step(self) -> None:
        self._t0 = time.perf_counter()
        self._comm0 = self.timer.total

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def end_step(self) -> StepTimes:
        wall = time.perf_counter() - self._t0
        comm = min(wall, max(0.0, self.timer.total - self._comm0))
        return StepTimes(wall, wall - comm, comm)


class CudaPhaseClock:
    """GPU: compute = CUDA-event time of the forward / backward / optimizer phases.

    Communication = wall - compute. Limits: DeepSpeed's gradient reduction runs inside
    ``backward`` (on the default stream without ``overlap_comm``), so a rank waiting for a slow
    peer there shows that wait as compute; with ``overlap_comm`` it runs on a side stream and is
    not counted. A pipeline step (``train_batch``) is one phase, its sends and receives included.
    """

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self._t0 = 0.0
        self._events: list[tuple[Any, Any]] = []

    def begin_step(self) -> None:
        self._t0 = time.perf_counter()
        self._events = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        cuda = self._torch.cuda
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._events.append((start, end))

    def end_step(self) -> StepTimes:
        self._torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        compute = min(wall, sum(s.elapsed_time(e) for s, e in self._events) / 1000.0)
        return StepTimes(wall, compute, wall - compute)


def clock_for(on_cpu: bool, timer: CommTimer) -> StepClock:
    """The step clock of this device (the seam the trainer loop uses)."""
    return CommTimerClock(timer) if on_cpu else CudaPhaseClock()
