"""The `aegaeon` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

DEFAULT_DEMO_MODEL_COUNT = 3


def _demo_models(args: argparse.Namespace) -> None:
    from aegaeon.demo import write_demo_models

    for path in write_demo_models(args.directory, count=args.count, seed=args.seed):
        print(path)


def _bench_switch(args: argparse.Namespace) -> None:
    from aegaeon.bench import switch

    switch.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aegaeon", description="Serve many LLMs on a few accelerators.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo-models", help="write tiny random-weight models with a real tokenizer (for demos and tests)"
    )
    demo.add_argument("directory", help="where to write the model directories")
    demo.add_argument("--count", type=int, default=DEFAULT_DEMO_MODEL_COUNT, help="how many models")
    demo.add_argument("--seed", type=int, default=0, help="seed of the first model's weights")
    demo.set_defaults(run=_demo_models)

    bench_parser = commands.add_parser("bench", help="measure this machine")
    bench = bench_parser.add_subparsers(dest="bench", required=True)
    switch = bench.add_parser(
        "switch", help="model switch latency by phase, against a cold start and a plain memcpy"
    )
    switch.add_argument("--json", action="store_true", help="print one JSON object")
    switch.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    switch.add_argument("--repeats", type=int, default=7, help="switches measured (median)")
    switch.add_argument("--cold-repeats", type=int, default=3, help="cold starts measured (median)")
    switch.add_argument(
        "--model-root", default=".bench", help="where the two 100M-parameter benchmark models are written"
    )
    switch.set_defaults(run=_bench_switch)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
