"""Batcher and work queue: full batches at once, partial ones after linger, a retry lane."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from broker.api.base import Operation
from broker.engine.batcher import Batch, Batcher, Lookup, WorkQueue
from broker.models import Query
from broker.testing import FakeClock, settle

US = "www.amazon.com"
DE = "www.amazon.de"
TITLE = ("itemInfo.title",)


class _Caller:
    """A receiver that keeps what it is told."""

    def __init__(self) -> None:
        self.outcomes: list[object] = []

    def receive(self, lookup: Lookup, query: Query, outcome: object) -> None:
        self.outcomes.append(outcome)


CALLER = _Caller()


def _lookup(asin: str, marketplace: str = US, resources: tuple[str, ...] = TITLE) -> Lookup:
    query = Query(asin, marketplace, resources)
    return Lookup(query, [(CALLER, query)])


def _take_all(work: WorkQueue, marketplaces: tuple[str, ...] = (US, DE)) -> list[Batch]:
    batches = []
    while (batch := work.take(marketplaces)) is not None:
        batches.append(batch)
    return batches


@pytest.fixture
async def running() -> AsyncIterator[tuple[FakeClock, WorkQueue, Batcher]]:
    """A batcher (linger 50 ms) running on a fake clock, cancelled after the test."""
    clock = FakeClock()
    work = WorkQueue()
    batcher = Batcher(work, clock=clock, batch_size=10, linger_s=0.05)
    task = asyncio.get_running_loop().create_task(batcher.run())
    await settle()
    yield clock, work, batcher
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class TestBatcher:
    """Grouping and flushing."""

    async def test_full_batch_flushes_at_once(
        self, running: tuple[FakeClock, WorkQueue, Batcher]
    ) -> None:
        """The tenth lookup of a group sends the batch with no time passing."""
        _, work, batcher = running
        for i in range(10):
            batcher.add(_lookup(f"B00000000{i}"))
        assert len(work) == 1
        (batch,) = _take_all(work)
        assert batch.asins == [f"B00000000{i}" for i in range(10)]
        assert batcher.pending(US) == 0

    async def test_partial_batch_waits_for_linger(
        self, running: tuple[FakeClock, WorkQueue, Batcher]
    ) -> None:
        """A partial group is sent when its linger time is up, not before."""
        clock, work, batcher = running
        for i in range(3):
            batcher.add(_lookup(f"B00000000{i}"))
        await clock.advance(0.049)
        assert len(work) == 0
        assert batcher.pending(US) == 3
        await clock.advance(0.0011)
        (batch,) = _take_all(work)
        assert len(batch.lookups) == 3
        assert batcher.pending(US) == 0

    async def test_linger_counts_from_first_lookup(
        self, running: tuple[FakeClock, WorkQueue, Batcher]
    ) -> None:
        """Lookups joining a lingering group do not extend its deadline."""
        clock, work, batcher = running
        batcher.add(_lookup("B000000001"))
        await clock.advance(0.04)
        batcher.add(_lookup("B000000002"))
        await clock.advance(0.0101)
        (batch,) = _take_all(work)
        assert batch.asins == ["B000000001", "B000000002"]

    async def test_groups_by_marketplace_and_resources(
        self, running: tuple[FakeClock, WorkQueue, Batcher]
    ) -> None:
        """Lookups share a request only with the same marketplace and resources."""
        clock, work, batcher = running
        batcher.add(_lookup("B000000001"))
        batcher.add(_lookup("B000000002", DE))
        batcher.add(_lookup("B000000003", US, ("images.primary.medium",)))
        batcher.add(_lookup("B000000004"))
        await clock.advance(0.05)
        groups = {(b.marketplace, b.resources): b.asins for b in _take_all(work)}
        assert groups == {
            (US, TITLE): ["B000000001", "B000000004"],
            (DE, TITLE): ["B000000002"],
            (US, ("images.primary.medium",)): ["B000000003"],
        }

    async def test_filled_group_is_replaced_by_a_younger_one(
        self, running: tuple[FakeClock, WorkQueue, Batcher]
    ) -> None:
        """After a group fills, the next lookups start a new group with its own linger."""
        clock, work, batcher = running
        for i in range(12):
            batcher.add(_lookup(f"B0000000{i:02d}"))
            await clock.advance(0.001)
        assert [len(b.lookups) for b in _take_all(work)] == [10]
        await clock.advance(0.039)
        assert len(work) == 0
        await clock.advance(0.0101)
        assert [len(b.lookups) for b in _take_all(work)] == [2]

    async def test_flush_sends_partial_groups(
        self, running: tuple[FakeClock, WorkQueue, Batcher]
    ) -> None:
        """flush() (end of a caller's input) sends every partial group now."""
        _, work, batcher = running
        batcher.add(_lookup("B000000001"))
        batcher.add(_lookup("B000000002", DE))
        batcher.flush()
        assert sorted(b.marketplace for b in _take_all(work)) == [US, DE]

    async def test_a_queued_partial_batch_takes_more_until_taken(self) -> None:
        """A partial batch flushed to the queue takes later lookups of its group while it
        waits; once a key takes it, a new batch starts, and the batcher keeps no trace of a
        batch that is gone (N11)."""
        import gc

        work = WorkQueue()
        batcher = Batcher(work, clock=FakeClock(), linger_s=0.05)
        batcher.add(_lookup("B000000001"))
        batcher.flush()
        batcher.add(_lookup("B000000002"))  # joins the queued batch
        (first,) = _take_all(work)
        assert first.asins == ["B000000001", "B000000002"]
        batcher.add(_lookup("B000000003"))  # the first was taken: a new lingering group
        batcher.flush()
        (second,) = _take_all(work)
        assert second.asins == ["B000000003"]
        del first, second
        gc.collect()
        assert not batcher._queued

    async def test_no_linger_still_groups_what_is_added_at_once(self) -> None:
        """With linger 0 the lookups added before the flush task's next turn (one caller's
        whole admission) share a batch, sent then, with no time passing: linger 0 sent each
        alone, so one get_items of 10 ASINs spent 10 requests of the daily quota."""
        work = WorkQueue()
        batcher = Batcher(work, clock=FakeClock(), linger_s=0)
        task = asyncio.get_running_loop().create_task(batcher.run())
        try:
            for i in range(12):
                batcher.add(_lookup(f"B0000000{i:02d}"))
            await settle()
            assert [len(b.lookups) for b in _take_all(work)] == [10, 2]
            batcher.add(_lookup("B000000099"))
            await settle()
            assert [b.asins for b in _take_all(work)] == [["B000000099"]]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    @pytest.mark.parametrize("size", [0, 11])
    def test_batch_size_bounds(self, size: int) -> None:
        """Amazon takes 1 to 10 ids per GetItems."""
        with pytest.raises(ValueError, match="batch_size"):
            Batcher(WorkQueue(), clock=FakeClock(), batch_size=size)

    async def test_small_batch_size(self) -> None:
        """batch_size 3 flushes every third lookup."""
        work = WorkQueue()
        batcher = Batcher(work, clock=FakeClock(), batch_size=3)
        for i in range(7):
            batcher.add(_lookup(f"B00000000{i}"))
        assert [len(b.lookups) for b in _take_all(work)] == [3, 3]
        assert batcher.pending(US) == 1


class TestWorkQueue:
    """FIFO with a head lane, per-marketplace takes, and dead batches dropped."""

    async def test_head_lane_for_retries(self) -> None:
        """A batch put at the front (a retry) is taken before older new work."""
        work = WorkQueue()
        first, second, retry = (Batch.of([_lookup(f"B00000000{i}")]) for i in range(3))
        work.put(first)
        work.put(second)
        work.put_front(retry)
        assert _take_all(work) == [retry, first, second]

    async def test_take_only_served_marketplaces(self) -> None:
        """A key takes only batches of marketplaces it serves; others stay queued in order."""
        work = WorkQueue()
        de = Batch.of([_lookup("B000000001", DE)])
        us = Batch.of([_lookup("B000000002")])
        work.put(de)
        work.put(us)
        assert work.has_work_for((US,))
        assert not work.has_work_for(("www.amazon.co.jp",))
        assert work.take((US,)) is us
        assert work.take((US,)) is None
        assert work.take((DE,)) is de

    async def test_dead_batches_dropped(self) -> None:
        """A batch whose every caller is gone leaves the queue at once (N11)."""
        work = WorkQueue()
        dead = Batch.of([_lookup("B000000001")])
        live = Batch.of([_lookup("B000000002")])
        work.put(dead)
        work.put(live)
        dead.lookups[0].detach(CALLER)
        assert len(work) == 1
        assert work.take((US,)) is live
        assert len(work) == 0

    async def test_wait_for_work(self) -> None:
        """wait_for() blocks until a batch for the key's marketplaces arrives."""
        work = WorkQueue()
        getter = asyncio.get_running_loop().create_task(work.wait_for(lambda: (US,)))
        await settle()
        work.put(Batch.of([_lookup("B000000001", DE)]))
        await settle()
        assert not getter.done()
        batch = Batch.of([_lookup("B000000002")])
        work.put(batch)
        await settle()
        assert getter.done()
        assert work.take((US,)) is batch

    async def test_wake_rereads_marketplaces(self) -> None:
        """wake() makes waiting keys re-read their marketplaces (a key changed state)."""
        work = WorkQueue()
        served: list[str] = []
        work.put(Batch.of([_lookup("B000000001", DE)]))
        getter = asyncio.get_running_loop().create_task(work.wait_for(lambda: served))
        await settle()
        assert not getter.done()
        served.append(DE)
        work.wake()
        await settle()
        assert getter.done()

    async def test_drain(self) -> None:
        """drain(marketplace) removes just that marketplace's batches."""
        work = WorkQueue()
        work.put(Batch.of([_lookup("B000000001")]))
        work.put(Batch.of([_lookup("B000000002", DE)]))
        assert [b.marketplace for b in work.drain(DE)] == [DE]
        assert len(work) == 1
        assert len(work.drain()) == 1
        assert len(work) == 0

    async def test_retries_then_operations_in_order_then_get_items(self) -> None:
        """Take order: retries first (put_front), then operations in the order made, then
        GetItems batches; an operation queued after a retry went ahead of it and of the
        operation made before it (get, op1, retry, op2 was taken op2, retry, op1, get)."""
        loop = asyncio.get_running_loop()

        def operation() -> Batch:
            future: asyncio.Future[object] = loop.create_future()
            return Batch(US, operation=Operation.SEARCH_ITEMS, op_future=future)  # type: ignore[arg-type]

        work = WorkQueue()
        get, retry = Batch.of([_lookup("B000000001")]), Batch.of([_lookup("B000000002")])
        op1, op2 = operation(), operation()
        work.put(get)
        work.put_ahead(op1)
        work.put_front(retry)
        work.put_ahead(op2)
        assert len(work) == 4
        assert _take_all(work) == [retry, op1, op2, get]

    async def test_a_discarded_operation_leaves_its_lane(self) -> None:
        """discard finds a batch in whichever lane it waits."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        op = Batch(US, operation=Operation.SEARCH_ITEMS, op_future=future)  # type: ignore[arg-type]
        work = WorkQueue()
        work.put_ahead(op)
        work.discard(op)
        assert len(work) == 0
        assert not work.has_work_for((US,))

    async def test_a_cancelled_operation_is_never_taken(self) -> None:
        """A search whose caller went away while it was queued is not handed to a key (it
        would spend a slot, and the daily quota, on an answer nobody reads)."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        op = Batch(US, operation=Operation.SEARCH_ITEMS, op_future=future)  # type: ignore[arg-type]
        work = WorkQueue()
        work.put_ahead(op)
        future.cancel()
        assert work.take((US,)) is None
        assert len(work) == 0

    async def test_operation_batch_liveness(self) -> None:
        """An operation batch lives while its caller waits."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        batch = Batch(US, operation=Operation.SEARCH_ITEMS, op_future=future)  # type: ignore[arg-type]
        assert batch.live()
        future.cancel()
        assert not batch.live()
