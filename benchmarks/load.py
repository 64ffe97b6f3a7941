"""Overload on loopback: many concurrent streams at twice the sustainable rate, then back to baseline.

    python benchmarks/load.py [--json] [--duration 60] [--overload 2.0]

1. Starts `aegaeon serve` on three tiny demo models (CPU, one colocated instance, a bounded wait
   per model) and learns each test prompt's greedy answer with one quiet request each.
2. Sustainable rate: a closed loop of CONCURRENCY clients for CALIBRATION_S; completions per second.
3. Overload: Poisson arrivals at `overload` x that rate for `duration` seconds, each a streaming
   completion. Every request must either complete with exactly its greedy answer and the asked
   number of tokens, or be refused with 429 and a Retry-After header; anything else is a failure.
4. Memory: the server's RSS (its process and its instance processes), the host KV pool in use and
   the running requests, read after warm-up and again after the overload drained: they must come
   back (RSS within RSS_TOLERANCE).

Prints a table, or one JSON object with --json; exits non-zero if a request failed or memory did
not come back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from pathlib import Path

import httpx
from served import children, rss_bytes, scrape, start_server

from aegaeon.demo import write_demo_models

BENCH_DIR = Path(".bench")
MODEL_COUNT = 3
PROMPTS = ("Tell me about rivers", "List three colours", "Why is the sky blue", "Count to five")
TOKENS = 24
CONCURRENCY = 8
CALIBRATION_S = 15.0
MAX_WAITING_PER_MODEL = 4
REQUEST_TIMEOUT_S = 300.0
SETTLE_S = 3.0
RSS_TOLERANCE = 0.10  # RSS may differ from its baseline by this fraction (allocator slack)
SEED = 0
# The node's memory gauges: KV held in the host pool, requests running.
GAUGES = ("aegaeon_host_kv_pool_allocated_bytes", "aegaeon_requests_running")


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (the instance processes)."""
    return sum(rss_bytes(member) for member in [pid, *children(pid)])


async def complete(client: httpx.AsyncClient, model: str, prompt: str) -> tuple[str, str, int]:
    """One streaming completion: (outcome, text, tokens); outcome is ok, refused or an error."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code == 429:
                await response.aread()
                return ("refused" if "retry-after" in response.headers else "429 without Retry-After"), "", 0
            if response.status_code != 200:
                await response.aread()
                return f"HTTP {response.status_code}", "", 0
            text, tokens = [], 0
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    return f"stream error: {chunk['error'].get('message')}", "", 0
                text.extend(choice["text"] for choice in chunk["choices"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            return "ok", "".join(text), tokens
    except httpx.HTTPError as error:
        return f"{type(error).__name__}", "", 0


async def expected_answers(url: str, models: list[str]) -> dict[tuple[str, str], str]:
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        answers = {}
        for model in models:
            for prompt in PROMPTS:
                outcome, text, _ = await complete(client, model, prompt)
                if outcome != "ok":
                    raise SystemExit(f"a quiet request failed: {outcome}")
                answers[(model, prompt)] = text
        return answers


async def sustainable_rate(url: str, models: list[str]) -> float:
    """Completions per second of a closed loop of CONCURRENCY clients (no refusals expected)."""
    done = 0
    stop = time.monotonic() + CALIBRATION_S
    rng = random.Random(SEED)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < stop:
            outcome, _, _ = await complete(client, rng.choice(models), rng.choice(PROMPTS))
            done += outcome == "ok"

    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        start = time.monotonic()
        await asyncio.gather(*(client_loop(client) for _ in range(CONCURRENCY)))
        return done / (time.monotonic() - start)


async def overload(url: str, models: list[str], answers: dict, rate: float, duration_s: float) -> dict:
    rng = random.Random(SEED + 1)
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    peak = 0
    running = 0

    async def one(model: str, prompt: str) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        start = time.monotonic()
        outcome, text, tokens = await complete(client, model, prompt)
        running -= 1
        if outcome == "ok" and (text != answers[(model, prompt)] or tokens != TOKENS):
            outcome = "wrong output"
        if outcome == "ok":
            latencies.append(time.monotonic() - start)
        outcomes[outcome] += 1

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        tasks, start = [], time.monotonic()
        next_at = start
        while next_at < start + duration_s:
            await asyncio.sleep(max(next_at - time.monotonic(), 0))
            tasks.append(asyncio.ensure_future(one(rng.choice(models), rng.choice(PROMPTS))))
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return {
        "sent": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "peak_concurrent_streams": peak,
        "median_latency_s": statistics.median(latencies) if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of overload")
    parser.add_argument("--overload", type=float, default=2.0, help="multiple of the sustainable rate")
    args = parser.parse_args()

    paths = write_demo_models(BENCH_DIR / "load-models", count=MODEL_COUNT, seed=SEED)
    models = [path.name for path in paths]
    server, url = start_server(
        paths, BENCH_DIR / "profiles.json", "--max-waiting-per-model", str(MAX_WAITING_PER_MODEL)
    )
    try:
        answers = asyncio.run(expected_answers(url, models))
        rate = asyncio.run(sustainable_rate(url, models))
        time.sleep(SETTLE_S)
        before = {"rss_bytes": tree_rss_bytes(server.pid), **scrape(url, GAUGES)}
        result = asyncio.run(overload(url, models, answers, args.overload * rate, args.duration))
        time.sleep(SETTLE_S)
        after = {"rss_bytes": tree_rss_bytes(server.pid), **scrape(url, GAUGES)}
    finally:
        server.terminate()
        server.wait(60)
    failures = {k: v for k, v in result["outcomes"].items() if k not in ("ok", "refused")}
    memory_back = (
        abs(after["rss_bytes"] - before["rss_bytes"]) <= RSS_TOLERANCE * before["rss_bytes"]
        and after["aegaeon_host_kv_pool_allocated_bytes"] == before["aegaeon_host_kv_pool_allocated_bytes"]
        and after["aegaeon_requests_running"] == 0
    )
    report = {
        "sustainable_rate_rps": rate,
        "offered_rate_rps": args.overload * rate,
        "duration_s": args.duration,
        **result,
        "memory_before": before,
        "memory_after": after,
        "failures": failures,
        "memory_back_to_baseline": memory_back,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"sustainable rate       {rate:.2f} req/s (closed loop, {CONCURRENCY} clients)")
        print(f"offered                {args.overload * rate:.2f} req/s for {args.duration:.0f} s")
        peak = result["peak_concurrent_streams"]
        print(f"sent                   {result['sent']}  peak concurrent streams {peak}")
        for outcome, count in sorted(result["outcomes"].items()):
            print(f"  {outcome:<20} {count}")
        print(f"median latency (ok)    {result['median_latency_s']}")
        for key in before:
            print(f"{key:<34} before {before[key]:>14,.0f}  after {after[key]:>14,.0f}")
        print(f"memory back to baseline: {memory_back}")
    if failures or not memory_back:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
