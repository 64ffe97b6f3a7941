"""`aegaeon simulate` and `aegaeon plan`: the simulator and the capacity planner on the command line."""

from __future__ import annotations

import argparse
import json
import sys

from aegaeon.config import (
    DEFAULT_ATTAINMENT_TARGET,
    DEFAULT_QMAX_S,
    DEFAULT_TBT_SLO_S,
    DEFAULT_TTFT_SLO_S,
    SLO,
    SchedulerConfig,
)
from aegaeon.sim.cluster import DEFAULT_GPUS_PER_NODE
from aegaeon.sim.derive import ARTIFACT_HOST_LINK_EFFICIENCY, DEFAULT_HOST_LINK_EFFICIENCY
from aegaeon.sim.models import DEFAULT_GPU, PAPER_KINDS, PAPER_MIX
from aegaeon.sim.plan import DEFAULT_MAX_GPUS
from aegaeon.sim.policies.aegaeon import ARENA_KINDS, AegaeonOptions
from aegaeon.sim.policies.mux import DEFAULT_MIN_KV_FRACTION, MuxOptions
from aegaeon.sim.policies.serverless import (
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_STARTUP_S,
    DEFAULT_TIMEOUT_S,
    ServerlessOptions,
)
from aegaeon.sim.runner import DEFAULT_DRAIN_S, POLICIES, SimOptions
from aegaeon.sim.scenario import Scenario
from aegaeon.sim.sweep import SWEEP_AXES
from aegaeon.sim.workload import (
    ARRIVAL_PROCESSES,
    DEFAULT_DURATION_S,
    DEFAULT_INPUT_MEAN,
    DEFAULT_LENGTH_SIGMA,
    DEFAULT_OUTPUT_MEAN,
    DEFAULT_RATE_PER_MODEL,
    LengthConfig,
    WorkloadConfig,
)

ALL = "all"
DEFAULT_MODELS = 16
DEFAULT_GPUS = 16


def _mix(value: str) -> tuple[float, ...]:
    try:
        parts = tuple(float(part) for part in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a mix is parts separated by ':', like 6:2:2; got {value!r}"
        ) from None
    return parts


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload (synthetic unless --trace is given)")
    group.add_argument("--trace", help="CSV or JSONL trace: arrival_s, model, input_tokens, output_tokens")
    group.add_argument(
        "--models", type=int, default=DEFAULT_MODELS, help=f"models (default {DEFAULT_MODELS})"
    )
    group.add_argument(
        "--rate", type=float, default=DEFAULT_RATE_PER_MODEL, help="mean requests/s per model (default 0.1)"
    )
    group.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="seconds of arrivals (600)")
    group.add_argument("--arrival", choices=ARRIVAL_PROCESSES, default="poisson", help="inter-arrival law")
    group.add_argument("--cv", type=float, default=1.0, help="gamma: coefficient of variation (burstiness)")
    group.add_argument("--zipf", type=float, default=0.0, help="Zipf exponent of model popularity (0: even)")
    group.add_argument(
        "--input-mean", type=float, default=DEFAULT_INPUT_MEAN, help="mean prompt tokens (700)"
    )
    group.add_argument(
        "--output-mean", type=float, default=DEFAULT_OUTPUT_MEAN, help="mean output tokens (290)"
    )
    group.add_argument(
        "--length-sigma", type=float, default=DEFAULT_LENGTH_SIGMA, help="log-spread of the lengths (0.8)"
    )
    group.add_argument("--seed", type=int, default=0)


def _add_cluster_args(parser: argparse.ArgumentParser, gpus_flag: bool = True) -> None:
    group = parser.add_argument_group("cluster and models")
    if gpus_flag:
        group.add_argument("--gpus", type=int, default=DEFAULT_GPUS, help=f"devices (default {DEFAULT_GPUS})")
    group.add_argument(
        "--gpus-per-node", type=int, default=DEFAULT_GPUS_PER_NODE, help="devices per node (default 8)"
    )
    if gpus_flag:
        group.add_argument(
            "--node-devices",
            type=int,
            nargs="+",
            metavar="N",
            help="devices of each node, when they differ, like 8 8 4 (instead of --gpus)",
        )
    group.add_argument(
        "--tensor-parallel-size",
        type=int,
        help="devices per instance, each model sharded over them (default: the catalogue's for the "
        "kinds, e.g. 4 for Qwen2.5-72B; 1 with --profiles)",
    )
    group.add_argument("--prefill-share", type=float, help="aegaeon: share of a node that prefills (3/8)")
    group.add_argument("--colocated", action="store_true", help="aegaeon: colocated instances, no P/D split")
    group.add_argument("--gpu", default=DEFAULT_GPU, help="bundled GPU profile: H100 or H800 (default H100)")
    group.add_argument(
        "--profiles", help="profile file written by `aegaeon profile` (instead of the bundled)"
    )
    group.add_argument("--device", help="the profile file's device to use (when it holds several)")
    group.add_argument(
        "--kinds",
        nargs="+",
        help=f"model kinds (profiled shapes) to map models onto (default {' '.join(PAPER_KINDS)})",
    )
    group.add_argument("--mix", type=_mix, help="ratio of models per kind, like 6:2:2 (the default)")
    group.add_argument("--kv-bytes", type=int, help="KV region per device (default: what memory leaves)")
    group.add_argument(
        "--link-efficiency",
        type=float,
        help=f"share of the host link a weight load or KV move reaches, bundled profiles only "
        f"(default {DEFAULT_HOST_LINK_EFFICIENCY}; the paper artifact's 3-5 s switches: "
        f"{ARTIFACT_HOST_LINK_EFFICIENCY})",
    )

    knobs = parser.add_argument_group("scheduler and policies")
    knobs.add_argument("--ttft", type=float, default=DEFAULT_TTFT_SLO_S, help="TTFT SLO in s (10)")
    knobs.add_argument("--tbt", type=float, default=DEFAULT_TBT_SLO_S, help="TBT SLO in s (0.1)")
    knobs.add_argument("--qmax", type=float, default=DEFAULT_QMAX_S, help="aegaeon: longest turn in s (1)")
    knobs.add_argument(
        "--qmax-max",
        type=float,
        help="aegaeon: slow switches may raise a round's QMAX up to this to keep alpha <= 1 (default: fixed)",
    )
    knobs.add_argument(
        "--arena",
        choices=ARENA_KINDS,
        default="engine",
        help="aegaeon: weight residency, the live engine's arena or fixed LRU slots (default engine)",
    )
    knobs.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="serverless: start deadline (15)"
    )
    knobs.add_argument(
        "--keep-alive", type=float, default=DEFAULT_KEEP_ALIVE_S, help="serverless: keep-alive (0)"
    )
    knobs.add_argument(
        "--startup",
        type=float,
        default=DEFAULT_STARTUP_S,
        help="serverless: engine start beyond the weight copy (13: vLLM's, measured)",
    )
    knobs.add_argument(
        "--mux-min-kv", type=float, default=DEFAULT_MIN_KV_FRACTION, help="mux: arena share kept for KV (0.2)"
    )
    knobs.add_argument("--drain", type=float, default=DEFAULT_DRAIN_S, help="s after the last arrival (300)")


def _add_policy_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy",
        nargs="+",
        default=[ALL],
        choices=[*POLICIES, ALL],
        help="policies to run (default: all)",
    )


def _policies(args: argparse.Namespace) -> list[str]:
    return list(POLICIES) if ALL in args.policy else list(dict.fromkeys(args.policy))


def _workload(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(
        num_models=args.models,
        rate_per_model=args.rate,
        duration_s=args.duration,
        arrival=args.arrival,
        cv=args.cv,
        zipf_s=args.zipf,
        lengths=LengthConfig(args.input_mean, args.output_mean, args.length_sigma),
        seed=args.seed,
    )


def _scenario(args: argparse.Namespace, gpus: int | None = None) -> Scenario:
    kinds = tuple(args.kinds) if args.kinds else PAPER_KINDS
    mix = args.mix if args.mix else (PAPER_MIX if kinds == PAPER_KINDS else None)
    return Scenario(
        gpus=gpus if gpus is not None else args.gpus,
        gpus_per_node=args.gpus_per_node,
        node_devices=tuple(args.node_devices) if getattr(args, "node_devices", None) else None,
        tensor_parallel_size=args.tensor_parallel_size,
        prefill_share=args.prefill_share,
        colocated=args.colocated,
        gpu=args.gpu,
        profiles=args.profiles,
        device=args.device,
        kinds=kinds,
        mix=mix,
        kv_bytes=args.kv_bytes,
        link_efficiency=args.link_efficiency,
        scheduler=SchedulerConfig(
            default_slo=SLO(args.ttft, args.tbt), qmax_s=args.qmax, qmax_max_s=args.qmax_max
        ),
        options=SimOptions(
            drain_s=args.drain,
            aegaeon=AegaeonOptions(arena=args.arena),
            serverless=ServerlessOptions(args.timeout, args.keep_alive, args.startup),
            mux=MuxOptions(args.mux_min_kv),
        ),
    )


def _arrivals(args: argparse.Namespace):
    from aegaeon.sim.trace import read_trace
    from aegaeon.sim.workload import generate_workload

    return read_trace(args.trace) if args.trace else generate_workload(_workload(args))


def _fail(command: str, error: Exception) -> None:
    raise SystemExit(f"aegaeon {command}: {error}")


def _simulate(args: argparse.Namespace) -> None:
    from aegaeon.sim.report import breakdown_line, results_table, sweep_table
    from aegaeon.sim.trace import write_trace

    try:
        scenario = _scenario(args)
        policies = _policies(args)
        if args.sweep:
            _run_sweep(args, scenario, policies, sweep_table)
            return
        arrivals = _arrivals(args)
        if args.save_trace:
            write_trace(args.save_trace, arrivals)
        models = scenario.model_set([a.model for a in arrivals])
        results = [scenario.run(policy, arrivals, models) for policy in policies]
    except (ValueError, KeyError) as error:
        _fail("simulate", error)
    if args.json:
        print(json.dumps({"results": [r.to_dict() for r in results]}))
        return
    print(f"{len(arrivals)} requests, {results[0].num_models} models, {scenario.gpus} GPUs ({models.device})")
    print(results_table(results))
    for result in results:
        if result.breakdown:
            print(f"{result.policy} latency breakdown: {breakdown_line(result.breakdown)}")


def _run_sweep(args: argparse.Namespace, scenario: Scenario, policies: list[str], sweep_table) -> None:
    from aegaeon.sim.plot import plot_sweep
    from aegaeon.sim.sweep import sweep

    if args.trace:
        raise ValueError("--sweep generates its workloads; it cannot take --trace")
    if not args.values:
        raise ValueError("--sweep needs --values, e.g. --values 16 32 48 64 80")

    def progress(policy: str, value: float, result) -> None:
        if not args.json:
            print(f"  {args.sweep}={value:g} {policy}: {100 * result.attainment:.1f}%", file=sys.stderr)

    points = sweep(args.sweep, args.values, policies, _workload(args), scenario, progress)
    if args.plot:
        plot_sweep(args.sweep, points, args.plot, args.target)
    if args.json:
        print(
            json.dumps(
                {
                    "axis": args.sweep,
                    "points": {
                        policy: [{"value": p.value, **p.result.to_dict()} for p in series]
                        for policy, series in points.items()
                    },
                }
            )
        )
        return
    print(sweep_table(args.sweep, points, args.target))
    if args.plot:
        print(f"plot written to {args.plot}")


def _plan(args: argparse.Namespace) -> None:
    from aegaeon.sim.plan import plan
    from aegaeon.sim.report import plan_table

    def progress(policy: str, gpus: int, attainment: float) -> None:
        if not args.json:
            print(f"  {policy} on {gpus} GPUs: {100 * attainment:.1f}%", file=sys.stderr)

    try:
        arrivals = _arrivals(args)
        answers = plan(
            arrivals, _scenario(args, gpus=1), _policies(args), args.attainment, args.max_gpus, progress
        )
    except (ValueError, KeyError) as error:
        _fail("plan", error)
    if args.json:
        print(json.dumps({"target": args.attainment, "plans": [a.to_dict() for a in answers]}))
        return
    models = len({a.model for a in arrivals})
    print(f"{len(arrivals)} requests over {models} models")
    print(plan_table(answers, args.attainment))


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the simulator's subcommands on the `aegaeon` parser."""
    simulate = commands.add_parser(
        "simulate",
        help="simulate a GPU pool serving many models: aegaeon against the baselines",
        description="Simulate aegaeon's scheduler (the real scheduler classes on a latency model) and the "
        "dedicated, serverless and mux baselines. See docs/simulation.md.",
    )
    _add_policy_arg(simulate)
    _add_workload_args(simulate)
    _add_cluster_args(simulate)
    simulate.add_argument(
        "--save-trace", metavar="FILE", help="also write the workload as a trace (CSV/JSONL)"
    )
    simulate.add_argument("--sweep", choices=SWEEP_AXES, help="sweep the model count or the per-model rate")
    simulate.add_argument("--values", type=float, nargs="+", help="the swept values")
    simulate.add_argument("--plot", metavar="PNG", help="with --sweep: draw the attainment curves")
    simulate.add_argument(
        "--target", type=float, default=DEFAULT_ATTAINMENT_TARGET, help="attainment that counts as sustained"
    )
    simulate.add_argument("--json", action="store_true", help="print one JSON object")
    simulate.set_defaults(run=_simulate)

    plan = commands.add_parser(
        "plan",
        help="the fewest GPUs each policy needs for a workload",
        description="Search over GPU counts for the fewest with which each policy reaches the target SLO "
        "attainment on a trace (or a synthetic workload).",
    )
    _add_policy_arg(plan)
    _add_workload_args(plan)
    _add_cluster_args(plan, gpus_flag=False)
    plan.add_argument(
        "--attainment", type=float, default=DEFAULT_ATTAINMENT_TARGET, help="target SLO attainment (0.9)"
    )
    plan.add_argument("--max-gpus", type=int, default=DEFAULT_MAX_GPUS, help="largest count tried (512)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(run=_plan)
