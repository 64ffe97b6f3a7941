"""The `aegaeon` command line."""

from __future__ import annotations

import argparse
import os
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

    from aegaeon.config import parse_model_entry
    from aegaeon.engine.engine import LLMEngine
    from aegaeon.instance.profiler import profile_model
    from aegaeon.scheduler.predictor import ProfileStore

    entries = [parse_model_entry(spec)[0] for spec in args.models]
    models = {entry.name: entry.path for entry in entries}
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


def _keys(args: argparse.Namespace) -> None:
    from aegaeon.serve.keys import KEYS_ENV, write_keys

    for path in write_keys(args.directory):
        print(path)
    print(
        f"give the directory to every `aegaeon serve` of the cluster: --cluster-keys {args.directory} "
        f"(or {KEYS_ENV}={args.directory}); an api server needs node.key, api.key and api.key_secret, "
        "a node node.key, node.key_secret and api.key"
    )


def _serve(args: argparse.Namespace) -> None:
    from aegaeon.serve.launch import run_server

    run_server(serve_config_from_args(args))


def serve_config_from_args(args: argparse.Namespace):
    """The YAML file's settings (if any) with every flag that was given laid over them."""
    import yaml

    from aegaeon.config import ADMIN_KEY_ENV, build_serve_config

    settings: dict = {}
    if args.config:
        with open(args.config) as config_file:
            settings = yaml.safe_load(config_file) or {}
        if not isinstance(settings, dict):
            raise SystemExit(f"{args.config}: expected a mapping of settings at the top level")
    flags = {
        "models": args.models or None,
        "device": args.device,
        "devices": args.devices,
        "dtype": args.dtype,
        "host": args.host,
        "port": args.port,
        "api_key": args.api_key,
        "api_key_file": args.api_key_file,
        "max_body_bytes": args.max_body_bytes,
        "max_n": args.max_n,
        "requests_per_minute": args.rate_limit,
        "prefill_instances": args.prefill_instances,
        "decode_instances": args.decode_instances,
        "kv_cache_bytes": args.kv_cache_bytes,
        "profile_path": args.profiles,
        "role": args.role,
        "redis_url": args.redis_url,
        "node_port": args.node_port,
        "drain_timeout_s": args.drain_timeout,
        "finished_ttl_s": args.finished_ttl,
        "metrics_port": args.metrics_port,
        "log_format": args.log_format,
        "max_waiting_per_model": args.max_waiting_per_model,
        "shed_waiting_after_s": args.shed_after,
        "cluster_keys": args.cluster_keys,
        "insecure": args.insecure or None,
        "admin_key": args.admin_key or os.environ.get(ADMIN_KEY_ENV),
    }
    settings.update({key: value for key, value in flags.items() if value is not None})
    if args.prefill_instances is not None or args.decode_instances is not None:
        settings["colocated"] = False
    if args.colocated:
        settings["colocated"] = True
    try:
        return build_serve_config(settings)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"aegaeon serve: {error}") from error


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

    from aegaeon.config import DEFAULT_PROFILE_PATH, LOG_FORMATS, ROLES

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

    serve = commands.add_parser(
        "serve",
        help="serve models over the OpenAI API",
        description="Serve models over the OpenAI API. Settings come from --config (YAML) and flags; "
        "a flag overrides the file. See docs/configuration.md for every setting.",
    )
    serve.add_argument(
        "models", nargs="*", metavar="MODEL", help="NAME=PATH, or a path or hub id (named by its last part)"
    )
    serve.add_argument("--config", help="YAML file with the same settings (models, SLOs, sizes)")
    serve.add_argument("--device", help="cpu or cuda (default: cpu)")
    serve.add_argument(
        "--devices",
        metavar="LIST",
        help="the node's devices, one or more per instance: GPU ordinals (0-7, 0,2,4) with --device cuda, "
        "or cpu,cpu (each CPU device a share of the cores) (default: every visible GPU; one CPU device)",
    )
    serve.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32)")
    serve.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: 8000; 0 picks a free one)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every API call")
    serve.add_argument(
        "--admin-key",
        help="serve the admin routes (add and remove models live) to 'Authorization: Bearer KEY' "
        "(default: $AEGAEON_ADMIN_KEY; none: no admin routes, they answer 404)",
    )
    serve.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="accept any of the keys in this file (one per line, # comments)",
    )
    serve.add_argument("--max-body-bytes", type=int, help="largest request body accepted (default: 4 MiB)")
    serve.add_argument(
        "--rate-limit",
        type=int,
        metavar="RPM",
        help="generation requests per minute per API key (default: none)",
    )
    serve.add_argument("--max-n", type=int, help="most choices (n) one request may ask for (default: 16)")
    layout = serve.add_mutually_exclusive_group()
    layout.add_argument(
        "--colocated", action="store_true", help="each instance prefills and decodes (the default)"
    )
    layout.add_argument("--prefill-instances", type=int, metavar="N", help="separate prefill instances")
    serve.add_argument("--decode-instances", type=int, metavar="M", help="separate decode instances")
    serve.add_argument("--kv-cache-bytes", type=int, help="bytes of KV blocks per instance")
    serve.add_argument("--profiles", help=f"latency profile file (default: {DEFAULT_PROFILE_PATH})")
    serve.add_argument(
        "--role",
        choices=ROLES,
        help="all: api server and node in one process (the default); node: serve models to the api "
        "servers of a Redis-shared cluster; api: route requests to that cluster's nodes by load",
    )
    serve.add_argument(
        "--redis-url",
        help="metadata store shared by api servers and nodes (redis://[:PASSWORD@]HOST:PORT/DB, rediss:// "
        "for TLS); without it the store lives in this process",
    )
    serve.add_argument(
        "--node-port", type=int, help="port a node takes api servers' requests on (default: a free one)"
    )
    serve.add_argument(
        "--log-format", choices=LOG_FORMATS, help="log lines as text (default) or one JSON object each"
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="with --role node: serve /metrics and /dashboard on this port (0: a free one)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM, how long requests in flight may finish before the server stops (default: 30)",
    )
    serve.add_argument(
        "--finished-ttl",
        type=float,
        metavar="SECONDS",
        help="how long the metadata store keeps an ended request's record (default: 3600)",
    )
    serve.add_argument(
        "--max-waiting-per-model",
        type=int,
        metavar="N",
        help="requests of one model waiting to start beyond which new ones get 429 (default: 256)",
    )
    serve.add_argument(
        "--shed-after",
        type=float,
        metavar="SECONDS",
        help="fail a request still waiting to start this long after arriving (default: never)",
    )
    serve.add_argument(
        "--cluster-keys",
        metavar="DIR",
        help="CURVE keys of the cluster (from `aegaeon keys DIR`; default: $AEGAEON_CLUSTER_KEYS): "
        "nodes encrypt their port and admit only api servers that hold the keys",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="let a node without cluster keys take requests on a non-loopback address (trusted network)",
    )
    serve.set_defaults(run=_serve)

    keys = commands.add_parser(
        "keys",
        help="make the cluster's CURVE keys",
        description="Write a node key pair and an api server key pair (ZeroMQ CURVE) into DIR.",
    )
    keys.add_argument("directory", help="where to write the keys (created if missing)")
    keys.set_defaults(run=_keys)

    from aegaeon.sim.commands import add_commands as add_simulator_commands

    add_simulator_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
