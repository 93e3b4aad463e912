"""The communication timers: what is counted, counted once, and given back on uninstall.

In-process, a one-rank gloo group (the collectives complete at once; what is checked is the
bookkeeping, not speed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from trainer_runner import free_port

from shardwise_trainer import commtime

pytestmark = pytest.mark.trainer


@pytest.fixture
def timer() -> Iterator[commtime.CommTimer]:
    originals = {name: getattr(dist, name) for name in commtime.COLLECTIVES if hasattr(dist, name)}
    t = commtime.install()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield t
    finally:
        dist.destroy_process_group()
        commtime.uninstall()
        assert {name: getattr(dist, name) for name in originals} == originals


def test_install_is_idempotent_and_wraps_both_namespaces(timer: commtime.CommTimer) -> None:
    assert commtime.install() is timer
    for module in (dist, c10d):
        assert hasattr(module.all_reduce, "__shardwise_commtime__")
        assert hasattr(module.all_gather_into_tensor, "__shardwise_commtime__")
    assert dist.all_reduce is c10d.all_reduce  # one wrapper per original function


def test_each_call_is_counted_once_nested_calls_included(timer: commtime.CommTimer) -> None:
    before = timer.calls
    dist.all_reduce(torch.ones(4))
    c10d.all_gather_into_tensor(torch.empty(4), torch.ones(4))
    out: list[object] = [None]
    dist.all_gather_object(out, {"a": 1})  # calls all_gather inside: still one call
    dist.barrier()
    assert timer.calls - before == 4
    assert out == [{"a": 1}]


def test_async_work_is_timed_at_wait(timer: commtime.CommTimer) -> None:
    work = dist.all_reduce(torch.ones(4), async_op=True)
    assert isinstance(work, commtime.TimedWork)
    calls = timer.calls
    work.wait()
    assert timer.calls == calls + 1
    assert work.is_completed()  # everything else is the real Work's


def test_coalescing_block_counts_as_one_call(timer: commtime.CommTimer) -> None:
    calls = timer.calls
    with c10d._coalescing_manager():  # gloo: no device-side coalescing, ops queued in Python
        dist.all_reduce(torch.ones(2))
        dist.all_reduce(torch.ones(2))
    assert timer.calls == calls + 1


def test_step_clock_splits_wall_time_into_compute_and_communication() -> None:
    t = commtime.CommTimer()
    slow_collective = t.wrap(time.sleep)  # stands in for a long wait
    clock = commtime.CommTimerClock(t)
    clock.begin_step()
    sum(i * i for i in range(10_000))  # compute
    slow_collective(0.05)
    times = clock.end_step()
    assert times.communication_seconds >= 0.05
    assert times.compute_seconds > 0
    assert times.compute_seconds + times.communication_seconds == pytest.approx(times.step_seconds)
    clock.begin_step()  # a step without communication is all compute
    times = clock.end_step()
    assert times.communication_seconds == 0 and times.compute_seconds == times.step_seconds
