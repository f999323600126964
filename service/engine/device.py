"""One thread per device that runs the compute of every engine on it, in arrival order (``DDPM_MODEL_SHARING=worker``).

A server with several models has one engine per model (its own queue, admission and rows). By default each engine
computes on its own worker thread (``threads``). With a :class:`DeviceWorker`, engines that share a device hand
their compute (warm-up, the UNet forward and per-row updates of an iteration, ``predict_eps`` jobs) to a single
thread with the device's intra-op threads, served first in, first out: each engine has at most one call
outstanding, so busy engines alternate forward by forward and the process holds one multi-threaded OpenMP team.
On the 2-core development CPU that measured 0.98× one model's throughput against 1.19× for separate workers
(``bench/multi_model.py``, README "Several models in one server"), so it is the opt-in mode.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["DeviceWorker"]

T = TypeVar("T")

_STOP = object()


class DeviceWorker:
    """A thread running ``torch`` with ``threads`` intra-op threads; :meth:`run` executes a callable on it."""

    def __init__(self, threads: int, name: str = "ddpm-device") -> None:
        self.threads = threads
        self._calls: queue.SimpleQueue = queue.SimpleQueue()  # FIFO: callers are served in arrival order
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the device thread; blocks the caller until it returns, re-raising what it raised."""
        if not self._thread.is_alive():
            raise RuntimeError("the device worker is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((fn, future))
        return future.result()

    def close(self) -> None:
        """Finish the calls already queued, then stop the thread."""
        if self._thread.is_alive():
            self._calls.put(_STOP)
            self._thread.join()

    def _loop(self) -> None:
        while (item := self._calls.get()) is not _STOP:
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            # Set before every call: another thread's torch.set_num_threads (an engine setting its own worker to
            # one thread) can reach this thread's count too (measured with torch 2.13 / libgomp).
            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller; the device thread serves the next call
                future.set_exception(exc)
