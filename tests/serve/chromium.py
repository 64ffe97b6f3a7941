"""A small headless-Chromium driver over the DevTools protocol, for tests.

`with Chromium() as browser:` starts Debian's `chromium` headless on a free debugging port (the
browser picks it and writes it to DevToolsActivePort in its profile directory), attaches to its page
over a websocket, and offers what a test needs: `navigate`, `evaluate`, `wait_for`, `screenshot`.
JavaScript exceptions the page throws are collected in `exceptions`.

A missing `chromium` raises (the test fails, it is not skipped): `make install` installs it.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

BINARIES = ("chromium", "chromium-browser")
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05
WINDOW = (1440, 1000)
PORT_FILE = "DevToolsActivePort"
# A property set on a page about to be navigated away from, to tell it from the next one.
STALE_MARK = "__aegaeonStalePage"


class ChromiumError(RuntimeError):
    pass


def find_chromium() -> str:
    for name in BINARIES:
        path = shutil.which(name)
        if path is not None:
            return path
    raise ChromiumError("chromium is not installed: `make install` installs it (apt-get install chromium)")


class Chromium:
    """One headless browser with one page, driven over the DevTools protocol."""

    def __init__(self, window: tuple[int, int] = WINDOW):
        self.binary = find_chromium()
        self.window = window
        self.exceptions: list[str] = []
        self._ids = itertools.count(1)
        self._profile: str | None = None
        self._process: subprocess.Popen | None = None
        self._socket: websocket.WebSocket | None = None

    def __enter__(self) -> Chromium:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self._profile = tempfile.mkdtemp(prefix="aegaeon-chromium-")
        args = [
            self.binary,
            "--headless=new",
            "--remote-debugging-port=0",
            f"--user-data-dir={self._profile}",
            f"--window-size={self.window[0]},{self.window[1]}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            # Containers often give /dev/shm only 64 MiB, too little for the renderer: use /tmp instead.
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--hide-scrollbars",
            "about:blank",
        ]
        if os.geteuid() == 0:  # Chromium refuses to run its sandbox as root
            args.insert(1, "--no-sandbox")
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = self._wait_for_port()
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5).read())
        page = next((t for t in targets if t.get("type") == "page"), None)
        if page is None:
            raise ChromiumError(f"chromium opened no page: {targets}")
        # No Origin header: Chromium refuses websocket clients from origins it was not told to allow.
        self._socket = websocket.create_connection(
            page["webSocketDebuggerUrl"], timeout=CALL_TIMEOUT_S, suppress_origin=True
        )
        self.call("Page.enable")
        self.call("Runtime.enable")

    def _wait_for_port(self) -> int:
        path = Path(self._profile, PORT_FILE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ChromiumError(f"chromium exited at start with status {self._process.returncode}")
            try:
                lines = path.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            if lines and lines[0].isdigit():
                return int(lines[0])
            time.sleep(POLL_S)
        raise ChromiumError(f"chromium did not open its debugging port within {START_TIMEOUT_S} s")

    # -- the protocol ---------------------------------------------------------------------------------

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer; events received meanwhile are looked at and dropped."""
        call_id = next(self._ids)
        self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise ChromiumError(f"{method}: {message['error']}")
                return message.get("result", {})
            if message.get("method") == "Runtime.exceptionThrown":
                details = message["params"]["exceptionDetails"]
                self.exceptions.append(
                    details.get("exception", {}).get("description") or details.get("text", "")
                )

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise ChromiumError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def navigate(self, url: str, timeout_s: float = CALL_TIMEOUT_S) -> None:
        """Open `url` and wait until its document has loaded.

        The old document is marked first: until the new one replaces it, the old one's readyState
        (already "complete") would otherwise pass for the new one's.
        """
        self.evaluate(f"window.{STALE_MARK} = true")
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise ChromiumError(f"could not open {url}: {result['errorText']}")
        self.wait_for(f"!window.{STALE_MARK} && document.readyState === 'complete'", timeout_s)

    def wait_for(self, expression: str, timeout_s: float, poll_s: float = 0.1) -> Any:
        """Evaluate `expression` until it is truthy; its value. ChromiumError on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise ChromiumError(f"{expression!r} stayed {value!r} for {timeout_s} s")
            time.sleep(poll_s)

    def screenshot(self, path: str | Path) -> Path:
        """Save the page as PNG (the whole page, not only the window)."""
        metrics = self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        path = Path(path)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        if self._socket is not None:
            try:
                self._socket.close()
            finally:
                self._socket = None
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None
