"""A dependency-free progress bar on stderr (redrawn in place on a terminal, a line every few seconds otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, initial: int = 0, desc: str = "", stream: TextIO | None = None,
                 min_interval: float | None = None) -> None:
        self.total, self.n, self.desc = total, initial, desc
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.min_interval = min_interval if min_interval is not None else (0.2 if self.tty else 10.0)
        self.start = self.last = time.perf_counter()
        self.start_n = initial
        self.fields: dict[str, str] = {}

    def update(self, k: int = 1, **fields: object) -> None:
        self.n += k
        self.fields.update({key: str(v) for key, v in fields.items()})
        now = time.perf_counter()
        if now - self.last >= self.min_interval or self.n >= self.total:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.n / self.total if self.total else 1.0
        rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        bar = "#" * int(20 * frac)
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
        line = f"{self.desc} [{bar:<20}] {self.n}/{self.total} {rate:.2f} it/s eta {eta:.0f}s {extra}"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.n < self.total:
            self._draw(time.perf_counter())
        if self.tty:
            self.stream.write("\n")
