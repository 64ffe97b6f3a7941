"""`aegaeon serve` as a real process for tests: its output read in the background, waited on by pattern."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.05


class ServeProcess:
    """`with ServeProcess(args) as server:` runs `aegaeon serve ARGS`; `wait_for` a line of its output."""

    def __init__(self, *args: str):
        self.args = ["serve", *args]
        self.lines: list[str] = []
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServeProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aegaeon.cli", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # Drained all the time: a full pipe would block the server mid-request.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout_s: float = STARTUP_TIMEOUT_S) -> re.Match:
        """The first output line matching `pattern` (a regex), waiting for it; fails with the output."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                match = compiled.search(line)
                if match:
                    return match
            seen = len(self.lines)
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(POLL_S)
        raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(self.lines)}")

    def stop(self) -> int:
        """SIGTERM, as an operator would; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def __exit__(self, *exc: object) -> None:
        # Gracefully first, as an operator would, so the server removes its shared memory.
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            self.process.wait()
        self._reader.join(STOP_TIMEOUT_S)
