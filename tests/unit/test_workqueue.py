"""Unit tests of the keyed work queue: coalescing, per-key exclusivity, delayed adds."""

from __future__ import annotations

import asyncio

from shardwise.handlers.workqueue import WorkQueue


def test_adds_coalesce_and_active_keys_are_requeued_once_after_done() -> None:
    async def scenario() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("a")
        queue.add("a")
        queue.add("b")
        assert len(queue) == 2
        seen = [await queue.get()]
        queue.add("a")  # while "a" is being processed
        queue.add("a")
        seen.append(await queue.get())
        queue.done("a")  # "a" comes back exactly once
        seen.append(await queue.get())
        queue.done("b")
        queue.done("a")
        assert len(queue) == 0
        return seen

    assert asyncio.run(scenario()) == ["a", "b", "a"]


def test_add_after_keeps_the_earliest_timer() -> None:
    async def scenario() -> str:
        queue: WorkQueue[str] = WorkQueue()
        queue.add_after("a", 0.01)
        queue.add_after("a", 30)
        return await asyncio.wait_for(queue.get(), timeout=5)

    assert asyncio.run(scenario()) == "a"


def test_forget_cancels_a_pending_timer() -> None:
    async def scenario() -> int:
        queue: WorkQueue[str] = WorkQueue()
        queue.add_after("a", 0.01)
        queue.forget("a")
        await asyncio.sleep(0.05)
        return len(queue)

    assert asyncio.run(scenario()) == 0
