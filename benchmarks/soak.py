"""Soak: many short requests against one `aegaeon serve`, watching whether anything grows without end.

    python benchmarks/soak.py [--requests 20000] [--concurrency 8] [--json]

Starts `aegaeon serve` on three tiny demo models (CPU, one colocated instance) and sends `--requests`
short completions over the three models from a closed loop of `--concurrency` clients. Before the
first and after every `--every` requests it samples the RSS of the server process and of its instance
processes, and, from `/metrics`, the ended requests the node holds, the requests in flight and the
timeline events its instances hold. A node whose histories are bounded shows those counts level off
at their caps (config.py: DEFAULT_ENDED_HISTORY, DEFAULT_TIMELINE_EVENTS) and its RSS level off with
them. Prints the series as a table, or one JSON object with --json; exits non-zero if a request failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from served import children, rss_bytes, scrape, start_server

from aegaeon.demo import write_demo_models

BENCH_DIR = Path(".bench")
MODEL_COUNT = 3
DEFAULT_REQUESTS = 20_000
DEFAULT_EVERY = 1_000
DEFAULT_CONCURRENCY = 8
TOKENS = 2  # short requests: the point is their number
PROMPTS = ("Hi", "Tell me about rivers", "Count to five", "Why")
REQUEST_TIMEOUT_S = 120.0
MIB = 1024 * 1024
# The node's history gauges: what it holds of ended requests, in-flight ones and timeline events.
GAUGES = (
    "aegaeon_node_ended_requests_held",
    "aegaeon_node_requests_in_flight",
    "aegaeon_instance_timeline_events",
)


@dataclass(frozen=True)
class Sample:
    requests: int  # sent and answered so far
    seconds: float
    server_rss_mib: float
    instances_rss_mib: float
    ended_held: int
    in_flight: int
    timeline_events: int


def sample(server: subprocess.Popen, url: str, requests: int, started: float) -> Sample:
    gauges = scrape(url, GAUGES)
    return Sample(
        requests=requests,
        seconds=round(time.monotonic() - started, 1),
        server_rss_mib=round(rss_bytes(server.pid) / MIB, 1),
        instances_rss_mib=round(sum(rss_bytes(pid) for pid in children(server.pid)) / MIB, 1),
        ended_held=int(gauges["aegaeon_node_ended_requests_held"]),
        in_flight=int(gauges["aegaeon_node_requests_in_flight"]),
        timeline_events=int(gauges["aegaeon_instance_timeline_events"]),
    )


def soak(url: str, server: subprocess.Popen, models: list[str], args: argparse.Namespace) -> dict:
    started = time.monotonic()
    samples = [sample(server, url, 0, started)]
    failures: list[str] = []
    counter = itertools.count()
    lock = threading.Lock()
    done = 0

    def client() -> None:
        nonlocal done
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
            while (index := next(counter)) < args.requests:
                body = {
                    "model": models[index % len(models)],
                    "prompt": PROMPTS[index % len(PROMPTS)],
                    "max_tokens": TOKENS,
                    "temperature": 0,
                }
                try:
                    response = http.post("/v1/completions", json=body)
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError as error:
                    failures.append(repr(error))
                with lock:
                    done += 1
                    if done % args.every == 0:
                        samples.append(sample(server, url, done, started))
                        if not args.json:
                            print(row(samples[-1]), flush=True)

    if not args.json:
        print(header(), flush=True)
        print(row(samples[0]), flush=True)
    with ThreadPoolExecutor(args.concurrency) as pool:
        for future in [pool.submit(client) for _ in range(args.concurrency)]:
            future.result()
    seconds = time.monotonic() - started
    return {
        "requests": args.requests,
        "failed": len(failures),
        "first_failures": failures[:5],
        "seconds": round(seconds, 1),
        "requests_per_s": round(args.requests / seconds, 1),
        "samples": [asdict(s) for s in samples],
    }


COLUMNS = ("requests", "seconds", "server_rss_mib", "instances_rss_mib", "ended_held", "in_flight")


def header() -> str:
    return "".join(f"{name:>18}" for name in (*COLUMNS, "timeline_events"))


def row(s: Sample) -> str:
    return "".join(f"{getattr(s, name):>18}" for name in (*COLUMNS, "timeline_events"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="requests to send")
    parser.add_argument("--every", type=int, default=DEFAULT_EVERY, help="sample after this many")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="clients at once")
    parser.add_argument(
        "--finished-ttl",
        type=float,
        metavar="SECONDS",
        help="the server's --finished-ttl: how long the store keeps ended requests (default: its own)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    model_dir = BENCH_DIR / "soak-models"
    paths = sorted(model_dir.glob("demo-*")) or write_demo_models(model_dir, count=MODEL_COUNT)
    extra = ["--finished-ttl", str(args.finished_ttl)] if args.finished_ttl else []
    server, url = start_server(paths, model_dir / "profiles.json", "--device", "cpu", "--colocated", *extra)
    try:
        models = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
        result = soak(url, server, models, args)
    finally:
        server.terminate()
        server.wait(60)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['requests']} requests in {result['seconds']} s ({result['requests_per_s']}/s), "
            f"{result['failed']} failed"
        )
    if result["failed"]:
        print("\n".join(result["first_failures"]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
