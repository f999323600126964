"""The shared device thread (service/engine/device.py): FIFO calls, errors handed back, its own thread count."""

from __future__ import annotations

import threading

import pytest
import torch

from service.engine.device import DeviceWorker


def test_runs_calls_in_order_and_hands_back_errors() -> None:
    worker = DeviceWorker(1)
    try:
        seen: list[int] = []
        assert [worker.run(lambda i=i: seen.append(i) or i * i) for i in range(5)] == [0, 1, 4, 9, 16]
        assert seen == [0, 1, 2, 3, 4]
        assert worker.run(threading.current_thread).name == "ddpm-device"

        def boom() -> None:
            raise ValueError("bad call")

        with pytest.raises(ValueError, match="bad call"):
            worker.run(boom)
        assert worker.run(lambda: 7) == 7  # still serving
    finally:
        worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.run(lambda: 1)


def test_keeps_its_thread_count_when_callers_set_theirs() -> None:
    """Engines set their own worker threads to one torch thread; the device thread must keep its count (ATen copies
    the process-wide count into a thread at its first parallel op)."""
    before = torch.get_num_threads()
    worker = DeviceWorker(2)
    try:
        def caller() -> None:
            torch.set_num_threads(1)
            torch.ones(2).add_(1)

        t = threading.Thread(target=caller)
        t.start()
        t.join()
        assert worker.run(torch.get_num_threads) == 2
        assert worker.run(lambda: (torch.randn(64, 64) @ torch.randn(64, 64), torch.get_num_threads())[1]) == 2
    finally:
        worker.close()
        torch.set_num_threads(before)
