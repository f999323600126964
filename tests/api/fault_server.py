"""``python -m tests.api.fault_server [--fault-file F] [--leak-kib N]``: the real server with test seams.

* ``--fault-file``: the engine runs a :class:`tests.faults.FaultyRunner` armed by that file's content.
* ``--leak-kib``: every HTTP request leaks N KiB and a file descriptor (the soak test's negative control).

Settings come from ``DDPM_*`` as for ``python -m service serve``; the exit status is ``serve``'s.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from service.api.app import create_app
from service.api.server import serve
from service.config import Settings
from tests.faults import faulty_engine_factory


class LeakyMiddleware:
    """Keeps ``kib`` KiB and one open file per request forever: what the soak test must catch."""

    def __init__(self, app, kib: int) -> None:
        self.app, self.kib, self.kept = app, kib, []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.kept.append((os.urandom(self.kib * 1024), open(os.devnull, "rb")))  # noqa: SIM115 - the leak
        await self.app(scope, receive, send)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault-file", type=Path)
    parser.add_argument("--leak-kib", type=int, default=0)
    args = parser.parse_args()
    settings = Settings()
    app = create_app(settings)
    if args.fault_file is not None:
        app.state.engine_factory = faulty_engine_factory(args.fault_file)
    if args.leak_kib:
        app.add_middleware(LeakyMiddleware, kib=args.leak_kib)
    return serve(settings, app)


if __name__ == "__main__":
    sys.exit(main())
