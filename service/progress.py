"""The CLI's progress bar (``train``, ``sample``, ``evaluate``): tqdm on stderr, line by line when not on a terminal.

On a terminal tqdm redraws the bar in place. Anywhere else (``train ... > train.log 2>&1``, CI) tqdm
would still redraw with carriage returns, and a log file would hold one endless line; there each
refresh, every ``min_interval`` seconds (10 by default), is written as a line of its own, in ASCII:

    train:  22%|##2       | 2242/10000 [8:53:58<30:46:06,  0.07it/s, loss=0.0164, img_s=21]

That is, ``desc: percent|bar| step/total [elapsed<remaining, rate, fields]``. The rate is always in
it/s (tqdm's default turns slow loops into s/it) and, like the remaining time, a moving average.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

__all__ = ["Progress"]

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


class Progress(tqdm):
    """``Progress(total, initial, desc)``; ``update(k, **fields)`` adds k steps and shows ``key=value`` fields."""

    monitor_interval = 0  # refreshes are checked on every update (miniters=1): no tqdm monitor thread needed

    def __init__(self, total: int, initial: int = 0, desc: str = "", stream: TextIO | None = None,
                 min_interval: float | None = None) -> None:
        stream = stream or sys.stderr
        self.lines = not stream.isatty()  # set before tqdm's __init__, which draws the first refresh
        super().__init__(
            total=total, initial=initial, desc=desc, file=stream, bar_format=BAR_FORMAT, miniters=1,
            mininterval=min_interval if min_interval is not None else (10.0 if self.lines else 0.2),
            # a log keeps every line already; leave=False stops close() from appending an empty one
            leave=not self.lines, ascii=True if self.lines else None, dynamic_ncols=not self.lines,
        )

    def update(self, n: float | None = 1, **fields: object) -> bool | None:  # type: ignore[override]
        if fields:
            self.set_postfix({k: str(v) for k, v in fields.items()}, refresh=False)
        return super().update(n)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """tqdm's hook for how a refresh is shown: in line mode, as one whole line."""
        if not self.lines:
            return super().display(msg, pos)
        line = self.__str__() if msg is None else msg
        if not line:  # close() clearing the bar: a line already written stays
            return False
        self.fp.write(line + "\n")
        self.fp.flush()
        return True

    def close(self) -> None:
        if self.lines and not self.disable and self.last_print_n != self.n:
            self.refresh()  # the final count, if no refresh has shown it
        super().close()
