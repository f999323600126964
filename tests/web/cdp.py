"""A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (no ports, no websockets).

Chromium started with ``--remote-debugging-pipe`` reads CDP commands from file descriptor 3 and writes
responses and events to file descriptor 4, each message a JSON object terminated by a NUL byte
(the transport Playwright and Puppeteer use). This module speaks that protocol with the standard
library only: launch a headless browser, open a page in a flat session, evaluate JavaScript, wait for
conditions, set file inputs and take screenshots.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM_FLAGS", "Browser", "CDPError", "Page", "find_chromium"]

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
)


class CDPError(RuntimeError):
    """A protocol error, a JavaScript exception, or a condition that did not become true in time."""


def find_chromium() -> str | None:
    """Debian's ``/usr/bin/chromium`` (or another Chromium/Chrome on PATH, or ``$CHROMIUM``)."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """A headless Chromium process driven through the DevTools pipe."""

    def __init__(self, executable: str, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._profile = tempfile.TemporaryDirectory(prefix="cdp-profile-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def map_pipes() -> None:  # in the child, before exec: our pipe ends become fds 3 and 4
            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        args = [*CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}", "about:blank"]
        self.proc = subprocess.Popen(
            [executable, *args],
            preexec_fn=map_pipes,  # pass_fds keeps fds but cannot renumber them to 3 and 4
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.send("Browser.getVersion")

    # -- transport -------------------------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError("timed out waiting for the browser")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise CDPError(f"the browser closed the pipe (exit code {self.proc.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile go to ``self.events``."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    # -- pages -----------------------------------------------------------------------------------

    def new_page(self) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session, target)
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            page.send(domain)
        return page

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close")
                self.proc.wait(timeout=10)
        except (CDPError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            for fd in (self._to_browser, self._from_browser):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    """One tab in a flat CDP session."""

    def __init__(self, browser: Browser, session: str, target_id: str) -> None:
        self.browser = browser
        self.session = session
        self.target_id = target_id

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.send(method, params, self.session)

    def goto(self, url: str, ready: str = "document.readyState === 'complete'", timeout_s: float = 20) -> None:
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        self.wait_for(ready, timeout_s)

    def eval(self, expression: str) -> Any:
        """Evaluate JavaScript in the page (awaiting promises) and return its JSON value."""
        result = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"JavaScript error in {expression!r}: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 20, interval_s: float = 0.05) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CDPError(f"timed out after {timeout_s} s waiting for {expression!r}; {self.problems()}")
            time.sleep(interval_s)

    def set_files(self, selector: str, paths: list[str]) -> None:
        """Choose files in an ``<input type=file>`` (fires its change event)."""
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise CDPError(f"no element matches {selector!r}")
        self.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(p) for p in paths]})

    def screenshot(self, path: str | Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def problems(self) -> str:
        """JavaScript exceptions and console errors seen so far, for failure messages."""
        lines = []
        for ev in self.browser.events:
            if ev.get("sessionId") != self.session:
                continue
            params = ev.get("params", {})
            if ev["method"] == "Runtime.exceptionThrown":
                d = params.get("exceptionDetails", {})
                lines.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
            elif ev["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
                lines.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif ev["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                lines.append("log: " + params["entry"].get("text", ""))
        return "; ".join(lines) or "no page errors"
