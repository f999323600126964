"""``python -m service serve``: uvicorn with a graceful drain on SIGTERM/SIGINT.

Plain uvicorn closes its listening socket as soon as a signal arrives, so a load balancer could never
see ``/readyz`` turn 503. Here the first SIGTERM (or Ctrl-C) starts a drain instead: the engine stops
admitting (``/readyz`` → 503 "draining", new generations → 503), requests in flight finish (up to
``DDPM_DRAIN_TIMEOUT_S``), and only then does uvicorn stop, so the process exits with status 0.
A second SIGINT exits at once.

Secure default: with no API keys configured, only a loopback bind starts (``auth.startup_refusal``); anything
else exits with status 2 and a message naming DDPM_API_KEYS, DDPM_API_KEYS_FILE and the opt-out DDPM_AUTH=none.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from service.api.app import begin_drain, create_app
from service.api.auth import is_loopback, startup_refusal
from service.config import Settings
from service.logging_setup import configure_logging

__all__ = ["DrainingServer", "serve"]

log = logging.getLogger("service.api")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains the app before stopping."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's handler, the signal is not re-raised after shutdown: a drained exit is a clean exit.
        if self._drain_task is not None or self._loop is None:
            if sig == signal.SIGINT and self._drain_task is not None:
                self.force_exit = True
            self.should_exit = True
            return
        log.info("received %s: draining (readyz → 503), in-flight requests finish", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await begin_drain(self.config.app)  # type: ignore[arg-type]
        except Exception:
            log.exception("drain failed")
        finally:
            self.should_exit = True


def serve(settings: Settings | None = None) -> int:
    """Run the service in this process until SIGTERM/SIGINT; 0 after a clean drain, 1 if the engine failed,
    2 if the settings refuse to start (no API keys on a non-loopback bind, unreadable key file)."""
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)
    refusal = startup_refusal(settings)
    if refusal is not None:
        log.critical("%s", refusal)
        return 2
    if not settings.resolved_api_keys() and not is_loopback(settings.host):
        log.warning("serving on %s without authentication (DDPM_AUTH=none)", settings.host)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep configure_logging's handler: uvicorn's loggers share our format
        access_log=False,  # RequestIdMiddleware writes the access line (with request id, route, status)
        lifespan="on",
        timeout_graceful_shutdown=settings.drain_timeout_s + 5,
    )
    server = DrainingServer(config)
    app.state.fatal = False

    def on_fatal() -> None:
        app.state.fatal = True
        server.should_exit = True

    app.state.on_fatal = on_fatal
    server.run()
    return 1 if app.state.fatal else 0
