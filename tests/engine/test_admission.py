"""Admission policy: the bounded queue, each client's share of it, round-robin between clients (engine/admission.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from service.engine.admission import FairQueue
from service.engine.batcher import Engine
from service.engine.client import ClientQuotaError, GenerationRequest, QueueFullError


@dataclass(eq=False)
class Item:
    name: str
    client: str | None
    rows: int = 1


def _drain(q: FairQueue[Item], free: int = 1_000) -> list[str]:
    """Pop until nothing fits; every client has ``free`` rows of room."""
    room: dict[str | None, int] = {}
    out = []
    while (e := q.pop_fitting(lambda c: free - room.get(c, 0))) is not None:
        out.append(e.name)
        room[e.client] = room.get(e.client, 0) + e.rows
    return out


def test_round_robin_between_clients_fifo_within_one() -> None:
    q: FairQueue[Item] = FairQueue(max_queue_rows=100, max_rows_per_client=100)
    for i in range(4):
        q.push(Item(f"a{i}", "a"))
    q.push(Item("b0", "b"))
    q.push(Item("c0", "c"))
    q.push(Item("b1", "b"))
    assert _drain(q) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]


def test_a_blocked_request_blocks_its_own_client_only() -> None:
    q: FairQueue[Item] = FairQueue(max_queue_rows=100, max_rows_per_client=100)
    q.push(Item("big", "a", rows=8))
    q.push(Item("small", "a", rows=1))
    q.push(Item("other", "b", rows=1))
    assert _drain(q, free=4) == ["other"]  # a's small request does not overtake a's big one
    assert _drain(q, free=9) == ["big", "small"]


def test_bounds_count_queued_and_running_rows() -> None:
    q: FairQueue[Item] = FairQueue(max_queue_rows=10, max_rows_per_client=4)
    first = Item("a0", "a", rows=3)
    q.push(first)
    assert q.refusal("a", 2) == "client_quota" and q.refusal("a", 1) is None
    assert q.refusal(None, 8) == "queue_full" and q.refusal(None, 7) is None  # in-process callers: no quota
    assert q.pop_fitting(lambda c: 10) is first  # running rows still count
    assert q.refusal("a", 2) == "client_quota" and q.client_rows("a") == 3
    q.release(first)
    assert q.refusal("a", 4) is None and q.total_rows == 0


def test_remove_queued_releases_rows_and_keeps_order() -> None:
    q: FairQueue[Item] = FairQueue(max_queue_rows=10, max_rows_per_client=10)
    for name, client in (("a0", "a"), ("a1", "a"), ("b0", "b"), ("a2", "a")):
        q.push(Item(name, client, rows=2))
    dropped = q.remove_queued(lambda e: e.name in ("a1", "b0"))
    assert [e.name for e in dropped] == ["a1", "b0"]
    assert q.total_rows == q.queued_rows == 4 and q.client_rows("b") == 0 and len(q) == 2
    assert _drain(q) == ["a0", "a2"]


async def _finish_order(flood: list, small) -> list[str]:
    """Names of the requests (a0, a1, …, b) in the order they finished."""
    order: list[str] = []

    async def track(name: str, h) -> None:
        await h.result()
        order.append(name)

    await asyncio.gather(*(track(f"a{i}", h) for i, h in enumerate(flood)), track("b", small))
    return order


def test_client_over_its_share_gets_quota_error_while_others_are_admitted(run_engine) -> None:
    async def body(engine: Engine):
        flood = [engine.submit(GenerationRequest(4, seed=i, sampler="ddim", steps=20, client="a")) for i in range(2)]
        with pytest.raises(ClientQuotaError) as quota:
            engine.submit(GenerationRequest(1, seed=9, sampler="ddim", steps=20, client="a"))
        other = engine.submit(GenerationRequest(4, seed=5, sampler="ddim", steps=20, client="b"))
        with pytest.raises(QueueFullError) as full:  # the queue itself: 12 rows
            engine.submit(GenerationRequest(4, seed=6, sampler="ddim", steps=20, client="c"))
        results = await asyncio.gather(*(h.result() for h in (*flood, other)))
        metrics = engine.metrics.rejections
        return quota.value, full.value, results, {r: metrics.labels(reason=r)._value.get() for r in
                                                   ("client_quota", "queue_full")}

    quota, full, results, rejected = run_engine(body, max_batch_rows=4, max_queue_rows=12, max_rows_per_client=8)
    assert quota.reason == "client_quota" and "max_rows_per_client=8" in str(quota) and quota.retry_after_s > 0
    assert type(full) is QueueFullError and full.reason == "queue_full"
    assert [r.images.shape[0] for r in results] == [4, 4, 4]
    assert rejected == {"client_quota": 1.0, "queue_full": 1.0}


def test_a_small_client_runs_at_once_beside_a_flood_that_fills_the_batch(run_engine) -> None:
    """Client b's short request is resident at once and stepped every iteration (its share of the batch), so it
    finishes first although client a's long requests filled the batch before it came."""

    async def body(engine: Engine):
        flood = [engine.submit(GenerationRequest(1, seed=i, sampler="ddim", steps=40, client="a")) for i in range(8)]
        while engine.stats()["iterations"] < 2:
            await asyncio.sleep(0.005)
        small = engine.submit(GenerationRequest(1, seed=99, sampler="ddim", steps=5, client="b"))
        return await _finish_order(flood, small), engine.stats()

    order, stats = run_engine(body, max_batch_rows=4, max_queue_rows=16, max_rows_per_client=16)
    assert order[0] == "b", order
    assert [o for o in order if o != "b"] == [f"a{i}" for i in range(8)]  # FIFO within a client
    assert stats["active_rows"] == 0 and stats["queued_rows"] == 0


def test_a_small_client_is_admitted_before_a_flood_queued_earlier(run_engine) -> None:
    """Round-robin: with one batch slot, client b's request runs right after the running one, not after a's ten."""

    async def body(engine: Engine):
        flood = [engine.submit(GenerationRequest(1, seed=i, sampler="ddim", steps=5, client="a")) for i in range(10)]
        small = engine.submit(GenerationRequest(1, seed=99, sampler="ddim", steps=5, client="b"))
        return await _finish_order(flood, small)

    order = run_engine(body, max_batch_rows=1, max_queue_rows=16, max_rows_per_client=16)
    assert order.index("b") <= 2, order  # FIFO would finish it last
    assert [o for o in order if o != "b"] == [f"a{i}" for i in range(10)]  # FIFO within a client
