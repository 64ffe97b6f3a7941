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


def _profile(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from aegaeon.engine.engine import LLMEngine
    from aegaeon.instance.profiler import profile_model
    from aegaeon.scheduler.predictor import ProfileStore

    models = dict(parse_model_arg(spec) for spec in args.models)
    engine = LLMEngine(models=models, device=args.device, dtype=args.dtype)
    path = Path(args.profiles).expanduser()
    store = ProfileStore.load(path)
    for name in models:
        profile = profile_model(engine, name)
        store.add(profile)
        print(json.dumps({"model": name, **profile.to_dict()}))
    path.parent.mkdir(parents=True, exist_ok=True)
    store.save(path)
    print(f"saved {len(models)} profile(s) to {path}")


def parse_model_arg(spec: str) -> tuple[str, str]:
    """`NAME=PATH`, or a path / hub id served under its last path part."""
    from aegaeon.engine.engine import model_name

    name, sep, path = spec.partition("=")
    return (name, path) if sep else (model_name(spec), spec)


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

    from aegaeon.config import DEFAULT_PROFILE_PATH

    profile = commands.add_parser(
        "profile", help="measure prefill/decode latency and switch time of models on this device"
    )
    profile.add_argument("models", nargs="+", metavar="MODEL", help="NAME=PATH, or a path or hub id")
    profile.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    profile.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    profile.add_argument(
        "--profiles",
        default=DEFAULT_PROFILE_PATH,
        help=f"profile file to update (default: {DEFAULT_PROFILE_PATH})",
    )
    profile.set_defaults(run=_profile)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
