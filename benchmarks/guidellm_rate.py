"""guidellm at a constant rate against a 3-model `aegaeon serve`: TTFT and ITL per model, zero errors.

    python benchmarks/guidellm_rate.py [--rate 1.0] [--requests 20] [--json]

Starts `aegaeon serve` on three tiny demo models, then runs one `guidellm run` per model at the
same time (so the server switches between them), each at a constant `rate` of streaming
`/v1/completions` requests of synthetic text until `requests` were sent. Prints each model's
TTFT and ITL (mean, median, p95) from guidellm's JSON report, or one JSON object with --json;
exits non-zero if any request errored or did not complete.

(Not named guidellm.py: run as a script, that file would shadow the package it drives.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from served import start_server

from aegaeon.demo import write_demo_models

BENCH_DIR = Path(".bench")
MODEL_COUNT = 3
SEED = 0
PROMPT_TOKENS = 64
OUTPUT_TOKENS = 32
# guidellm imports torch, transformers and datasets before its first request: minutes on a busy CPU.
GUIDELLM_TIMEOUT_S = 900
# guidellm's distributions of each latency, in ms, and the statistics the table shows of them.
METRICS = {"ttft_ms": "time_to_first_token_ms", "itl_ms": "inter_token_latency_ms"}


def guidellm_command(url: str, model: Path, rate: float, requests: int, report: Path) -> list[str]:
    """`guidellm run` for one served model: constant rate, synthetic prompts, the model's own tokenizer."""
    backend = f"kind=openai_http,target={url},model={model.name},request_format=/v1/completions"
    return [
        str(Path(sys.executable).with_name("guidellm")),
        "run",
        "--backend",
        backend,
        "--profile",
        f"kind=constant,rate={rate}",
        "--constraint",
        f"kind=max_requests,count={requests}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
        "--tokenizer",
        f"kind=huggingface_auto,model={model}",
        "--output",
        f"kind=json,path={report}",
        "--disable-console",
    ]


def summary(report: Path) -> dict:
    """Request counts and the TTFT/ITL statistics of the one benchmark in a guidellm JSON report."""
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    metrics = benchmark["metrics"]
    result = dict(metrics["request_totals"])
    for name, key in METRICS.items():
        successful = metrics[key]["successful"]
        result[name] = {
            "mean": successful["mean"],
            "median": successful["median"],
            "p95": successful["percentiles"]["p95"],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second, per model")
    parser.add_argument("--requests", type=int, default=20, help="requests per model")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    paths = write_demo_models(BENCH_DIR / "guidellm-models", count=MODEL_COUNT, seed=SEED)
    reports = {path.name: BENCH_DIR / f"guidellm-{path.name}.json" for path in paths}
    server, url = start_server(paths, BENCH_DIR / "profiles.json")
    try:
        runs = {
            path.name: subprocess.Popen(
                guidellm_command(url, path, args.rate, args.requests, reports[path.name]),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for path in paths
        }
        outputs = {name: run.communicate(timeout=GUIDELLM_TIMEOUT_S)[0] for name, run in runs.items()}
    finally:
        server.terminate()
        server.wait(60)
    for name, run in runs.items():
        if run.returncode != 0:
            raise SystemExit(f"guidellm for {name} exited {run.returncode}:\n{outputs[name]}")
    results = {name: summary(report) for name, report in reports.items()}
    failed = {name: r for name, r in results.items() if r["errored"] or r["incomplete"]}

    if args.json:
        print(json.dumps({"rate_rps_per_model": args.rate, "models": results}))
    else:
        print(
            f"guidellm constant {args.rate:g} req/s per model, {args.requests} requests each, "
            f"{PROMPT_TOKENS} prompt + {OUTPUT_TOKENS} output tokens, streamed /v1/completions"
        )
        print(
            f"{'model':<14} {'ok':>4} {'err':>4} {'inc':>4}  "
            f"{'TTFT mean':>10} {'median':>8} {'p95':>8}  {'ITL mean':>9} {'median':>7} {'p95':>7}  (ms)"
        )
        for name, r in results.items():
            ttft, itl = r["ttft_ms"], r["itl_ms"]
            print(
                f"{name:<14} {r['successful']:>4} {r['errored']:>4} {r['incomplete']:>4}  "
                f"{ttft['mean']:>10.1f} {ttft['median']:>8.1f} {ttft['p95']:>8.1f}  "
                f"{itl['mean']:>9.1f} {itl['median']:>7.1f} {itl['p95']:>7.1f}"
            )
    if failed:
        raise SystemExit(f"requests errored or did not complete: {failed}")


if __name__ == "__main__":
    main()
