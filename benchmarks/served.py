"""An `aegaeon serve` process for the load benchmarks: start it, read its memory and its metrics."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 300.0
KIB = 1024


def start_server(models: list[Path], profiles: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`aegaeon serve MODELS --profiles PROFILES EXTRA...` on a free port; the process and its base URL."""
    server = subprocess.Popen(
        [sys.executable, "-m", "aegaeon.cli", "serve", *map(str, models), "--port", "0"]
        + ["--profiles", str(profiles), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url, deadline = None, time.monotonic() + STARTUP_TIMEOUT_S
    for line in server.stdout:
        if match := re.search(r"OpenAI API at (http://\S+)/v1", line):
            url = match.group(1)
        if "Uvicorn running" in line or time.monotonic() > deadline:
            break
    if url is None:
        server.kill()
        raise SystemExit("the server did not start")
    # Keep draining its output, or a full pipe would stall it.
    threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()
    return server, url


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) * KIB if match else 0


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a server's instance processes)."""
    found = []
    for path in Path("/proc").iterdir():
        if not path.name.isdigit():
            continue
        try:
            parent = int((path / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            found.append(int(path.name))
    return found


def scrape(url: str, wanted: tuple[str, ...]) -> dict[str, float]:
    """The `wanted` series of the server's /metrics, each summed over its labels."""
    values = dict.fromkeys(wanted, 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values
