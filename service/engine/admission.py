"""The engine's admission policy: a bounded queue, a per-client share of it, and round-robin admission.

Every request belongs to a client (``GenerationRequest.client``: the HTTP layer passes the API key's fingerprint,
or the remote address when authentication is off; ``None`` is an in-process caller). Two bounds hold at
submission, counting queued *and* running rows:

* all clients together stay within ``max_queue_rows`` (else ``queue_full``),
* each client stays within ``max_rows_per_client`` (else ``client_quota``), so one client's burst cannot fill the
  queue while others are turned away. In-process callers (``client=None``) have no per-client cap.

Admission. A queued request becomes *resident* (its rows get their state and may be stepped) when its client has
room: each client may hold up to one batch (``max_batch_rows``) of resident rows, oldest request first, so one
client's backlog never keeps another client's request out. Queued requests are admitted round-robin over clients;
within a client in order, and a client's oldest request that does not fit yet is not skipped, so large requests are
never starved by the same client's smaller ones (with a single client this is the strict FIFO the engine had
before).

Batch. With several clients, more rows can be resident than one forward takes. Each iteration the engine steps at
most ``max_batch_rows`` of them (``Engine._select_locked``): the oldest resident request always, then up to an
equal share of rows per client, then whatever else fits, oldest first. A client's request therefore starts at the
next iteration and runs at its own pace, while another client's flood shares the rest; rows that sit an iteration
out keep their state in memory (bounded by ``max_queue_rows``). Because the oldest request always advances, every
request finishes.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Generic, Literal, Protocol, TypeVar

__all__ = ["FairQueue", "Queued", "Refusal"]

Refusal = Literal["queue_full", "client_quota"]


class Queued(Protocol):
    """What the policy needs to know about a request."""

    @property
    def rows(self) -> int: ...

    @property
    def client(self) -> str | None: ...


E = TypeVar("E", bound=Queued)


class FairQueue(Generic[E]):
    """Queued requests per client in a ring, and every client's queued + running rows."""

    def __init__(self, max_queue_rows: int, max_rows_per_client: int) -> None:
        self.max_queue_rows = max_queue_rows
        self.max_rows_per_client = max_rows_per_client
        self._ring: dict[str | None, deque[E]] = {}  # insertion order = turn order; the first key's turn is next
        self._rows: Counter[str | None] = Counter()  # queued + running rows per client
        self.queued_rows = 0
        self.total_rows = 0  # queued + running rows of every client

    def __len__(self) -> int:
        return sum(len(q) for q in self._ring.values())

    def __bool__(self) -> bool:
        return bool(self._ring)

    def __iter__(self) -> Iterator[E]:
        for q in self._ring.values():
            yield from q

    def client_rows(self, client: str | None) -> int:
        return self._rows[client]

    def refusal(self, client: str | None, rows: int) -> Refusal | None:
        """Why ``rows`` more rows of ``client`` cannot be accepted now, or None."""
        if self.total_rows + rows > self.max_queue_rows:
            return "queue_full"
        if client is not None and self._rows[client] + rows > self.max_rows_per_client:
            return "client_quota"
        return None

    def push(self, entry: E) -> None:
        """Queue ``entry`` (after :meth:`refusal` said None); a new client joins the end of the ring."""
        self._ring.setdefault(entry.client, deque()).append(entry)
        self._rows[entry.client] += entry.rows
        self.queued_rows += entry.rows
        self.total_rows += entry.rows

    def pop_fitting(self, free_rows: Callable[[str | None], int]) -> E | None:
        """The next request, in round-robin order over clients, whose rows fit into ``free_rows(its client)``; it
        counts as running now. A client's oldest request that does not fit blocks only that client."""
        for client, q in self._ring.items():
            if q[0].rows <= free_rows(client):
                return self._take(client)
        return None

    def _take(self, client: str | None) -> E:
        q = self._ring.pop(client)
        entry = q.popleft()
        if q:
            self._ring[client] = q  # back of the ring: every other client with queued work goes first
        self.queued_rows -= entry.rows
        return entry

    def remove_queued(self, drop: Callable[[E], bool]) -> list[E]:
        """Take the queued requests for which ``drop`` is true out of the queue (they hold no rows any more)."""
        dropped: list[E] = []
        for client in list(self._ring):
            keep: deque[E] = deque()
            for e in self._ring[client]:
                (dropped if drop(e) else keep).append(e)
            if keep:
                self._ring[client] = keep
            else:
                del self._ring[client]
        for e in dropped:
            self.queued_rows -= e.rows
            self.release(e)
        return dropped

    def release(self, entry: E) -> None:
        """A running (or just removed) request finished: its rows no longer count against anyone."""
        self._rows[entry.client] -= entry.rows
        if self._rows[entry.client] <= 0:
            del self._rows[entry.client]
        self.total_rows -= entry.rows

    def clear(self) -> list[E]:
        """Every queued request, removed (the engine is stopping)."""
        return self.remove_queued(lambda e: True)
