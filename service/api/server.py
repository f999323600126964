"""``python -m service serve``: uvicorn with a graceful drain on SIGTERM/SIGINT.

Plain uvicorn closes its listening socket as soon as a signal arrives, so a load balancer could never
see ``/readyz`` turn 503. Here the first SIGTERM (or Ctrl-C) starts a drain instead: the engine stops
admitting (``/readyz`` → 503 "draining", new generations → 503), requests in flight finish (up to
``DDPM_DRAIN_TIMEOUT_S``), and only then does uvicorn stop, so the process exits with status 0.
A second SIGINT exits at once.

If the engine's worker thread dies, every request in flight has already failed with 503; ``/healthz`` and
``/readyz`` answer 503 and, one second later (so probes and load balancers see it), the server stops and the
process exits with status 1 for Docker or Kubernetes to restart it.

Connections: ``DDPM_MAX_CONNECTIONS`` is uvicorn's ``limit_concurrency`` (beyond it new requests get 503 at once)
and ``DDPM_KEEP_ALIVE_S`` its keep-alive timeout. uvicorn has no header or body read timeout, so a slow client
holds its connection (not a worker: the event loop serves everyone else meanwhile); put a proxy in front on an
untrusted network (README, "Deployment": the compose ``scale`` profile's nginx sets header/body timeouts and the
body size). ``DDPM_FORWARDED_ALLOW_IPS`` names the proxies whose ``X-Forwarded-For`` is the client address, which
is what fair share counts per client when authentication is off.

Secure default: with no API keys configured, only a loopback bind starts (``auth.startup_refusal``); anything
else exits with status 2 and a message naming DDPM_API_KEYS, DDPM_API_KEYS_FILE and the opt-out DDPM_AUTH=none.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.api.app import begin_drain, create_app
from service.api.auth import is_loopback, startup_refusal
from service.config import Settings
from service.logging_setup import configure_logging

__all__ = ["FATAL_EXIT_DELAY_S", "DrainingServer", "serve"]

log = logging.getLogger("service.api")

FATAL_EXIT_DELAY_S = 1.0  # after the engine died: time for probes to see 503 before the port closes


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


def serve(settings: Settings | None = None, app: FastAPI | None = None) -> int:
    """Run the service in this process until SIGTERM/SIGINT; 0 after a clean drain, 1 if the engine failed,
    2 if the settings refuse to start (no API keys on a non-loopback bind, unreadable key file).

    ``app``: an app made by ``create_app(settings)`` (tests set ``app.state.engine_factory`` on it); default a new one.
    """
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)
    refusal = startup_refusal(settings)
    if refusal is not None:
        log.critical("%s", refusal)
        return 2
    if not settings.resolved_api_keys() and not is_loopback(settings.host):
        log.warning("serving on %s without authentication (DDPM_AUTH=none)", settings.host)
    app = app or create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_s,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        log_level=settings.log_level,
        log_config=None,  # keep configure_logging's handler: uvicorn's loggers share our format
        access_log=False,  # RequestIdMiddleware writes the access line (with request id, route, status)
        lifespan="on",
        timeout_graceful_shutdown=settings.drain_timeout_s + 5,
    )
    server = DrainingServer(config)

    def on_fatal() -> None:  # on the event loop (app.mark_failed): the engine failed to start, or its worker died
        asyncio.get_running_loop().call_later(FATAL_EXIT_DELAY_S, lambda: setattr(server, "should_exit", True))

    app.state.on_fatal = on_fatal
    server.run()
    return 1 if app.state.fatal else 0
