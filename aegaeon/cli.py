"""The `aegaeon` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

DEFAULT_DEMO_MODEL_COUNT = 3


def _demo_models(args: argparse.Namespace) -> None:
    from aegaeon.demo import write_demo_models

    for path in write_demo_models(args.directory, count=args.count, seed=args.seed):
        print(path)


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
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
