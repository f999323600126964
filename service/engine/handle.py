"""The asyncio side of a submitted request: a future for the result and a queue of progress events.

The handle lives on the event loop that submitted it; the engine's worker thread only touches it
through :meth:`Handle.post_event` / :meth:`Handle.post_result` / :meth:`Handle.post_error`, which hop
onto that loop with ``loop.call_soon_threadsafe``. Cancellation goes the other way through a flag the
worker reads at its next iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Callable

from service.engine.client import GenerationRequest, GenerationResult, ProgressEvent

__all__ = ["Handle", "post"]

_ids = itertools.count(1)
_END = object()  # end-of-events marker


def _consume(fut: asyncio.Future) -> None:
    """Mark a failed future's exception as retrieved (nobody has to await ``result``)."""
    if not fut.cancelled():
        fut.exception()


class Handle:
    """A submitted request (implements ``client.RequestHandle``).

    Progress events are buffered until read: at most one per step plus the previews asked for, so the
    buffer is bounded by the request's own size. ``result()`` being cancelled (the awaiting task was
    cancelled, e.g. the client went away) cancels the request.
    """

    def __init__(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        submitted_at: float,
        deadline: float,
        wake: Callable[[], None],
    ) -> None:
        self.id = request.request_id or f"req-{next(_ids)}"
        self.seed = request.seed
        self.request = request
        self.submitted_at = submitted_at  # time.monotonic() at submission
        self.deadline = deadline  # time.monotonic() after which the request times out
        self.admitted_at: float | None = None  # when its rows joined the running batch
        self.first_step_at: float | None = None  # when its first step finished
        self._loop = loop
        self._wake = wake
        self._future: asyncio.Future[GenerationResult] = loop.create_future()
        self._future.add_done_callback(_consume)
        self._events: asyncio.Queue[object] = asyncio.Queue()
        self._cancel = threading.Event()
        self.finished = False  # set by the worker when it resolved the request (worker thread only)

    # ----------------------------------------------------------------- client API (event loop thread)
    async def result(self) -> GenerationResult:
        """The images; raises RequestTimeoutError, RequestCancelledError or EngineError."""
        try:
            return await asyncio.shield(self._future)
        except asyncio.CancelledError:
            if not self._future.done():
                self.cancel()
            raise

    def events(self) -> AsyncIterator[ProgressEvent]:
        """Progress events in order; ends when the request finishes (then call ``result``)."""
        return self._iter_events()

    async def _iter_events(self) -> AsyncIterator[ProgressEvent]:
        while True:
            event = await self._events.get()
            if event is _END:
                self._events.put_nowait(_END)  # later iterators end at once too
                return
            yield event  # type: ignore[misc]

    def cancel(self) -> None:
        """Drop the request's rows at the engine's next iteration (idempotent, any thread)."""
        if not self._cancel.is_set():
            self._cancel.set()
            self._wake()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        """Whether the result is available (event loop thread)."""
        return self._future.done()

    # ------------------------------------------------------------------- worker side (any thread)
    def callbacks_for_event(self, event: ProgressEvent) -> tuple[asyncio.AbstractEventLoop, Callable[[], None]]:
        return self._loop, lambda: self._events.put_nowait(event)

    def callbacks_for_result(self, result: GenerationResult) -> tuple[asyncio.AbstractEventLoop, Callable[[], None]]:
        def resolve() -> None:
            if not self._future.done():
                self._future.set_result(result)
            self._events.put_nowait(_END)

        return self._loop, resolve

    def callbacks_for_error(self, error: BaseException) -> tuple[asyncio.AbstractEventLoop, Callable[[], None]]:
        def resolve() -> None:
            if not self._future.done():
                self._future.set_exception(error)
            self._events.put_nowait(_END)

        return self._loop, resolve


def post(calls: list[tuple[asyncio.AbstractEventLoop, Callable[[], None]]]) -> None:
    """Run ``calls`` on their event loops, one ``call_soon_threadsafe`` per loop, in order."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
    for loop, fn in calls:
        by_loop.setdefault(loop, []).append(fn)
    for loop, fns in by_loop.items():

        def run_all(fns: list[Callable[[], None]] = fns) -> None:
            for fn in fns:
                fn()

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(run_all)
