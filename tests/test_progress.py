"""The CLI's progress bar (service.progress): redrawn in place on a terminal, whole lines in a log."""

from __future__ import annotations

import io

from service.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_plain_line_per_refresh() -> None:
    log = io.StringIO()
    bar = Progress(30, initial=5, desc="train", stream=log, min_interval=0)
    for i in range(25):
        bar.update(1, loss=f"{0.1 / (i + 1):.4f}", img_s=21)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text and text.endswith("\n") and text.isascii()
    lines = text.splitlines()
    assert len(lines) == 1 + 25 and all(line.startswith("train: ") for line in lines)
    assert " 5/30 " in lines[0]  # a resumed run starts from its step
    assert " 30/30 [" in lines[-1] and "it/s, loss=0.0040, img_s=21]" in lines[-1]


def test_a_log_is_written_every_min_interval_and_the_final_count_on_close() -> None:
    log = io.StringIO()
    bar = Progress(1000, desc="ddim-10", stream=log, min_interval=3600)
    for _ in range(999):
        bar.update()
    bar.close()
    bar.close()  # closing twice writes nothing more
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and " 0/1000 " in lines[0] and " 999/1000 " in lines[1]


def test_a_slow_loop_still_reports_it_per_s() -> None:
    log = io.StringIO()
    bar = Progress(10, desc="train", stream=log, min_interval=0)
    bar.start_t -= 100  # as if the first step took 100 s
    bar.last_print_t -= 100
    bar.update()
    bar.close()
    assert "0.01it/s" in log.getvalue() and "s/it" not in log.getvalue()


def test_a_terminal_gets_the_bar_redrawn_in_place() -> None:
    term = _Terminal()
    bar = Progress(3, desc="ddim-3", stream=term, min_interval=0)
    for _ in range(3):
        bar.update()
    bar.close()
    text = term.getvalue()
    assert text.count("\r") >= 4 and text.count("\n") == 1 and text.endswith("\n")
    assert "ddim-3: 100%" in text and "3/3" in text
