"""The simulator against the real system: one small workload through both, the figures compared.

    python benchmarks/sim_validate.py [--json] [--duration 120] [--rates 0.25 0.5 0.75 1] [--models 4]
        [--scale small|tiny] [--profiles loop|engine]

Real: small demo models (--scale small: hidden 768, 8 layers, about 44M parameters, a decode step of
about 12 ms and a prefill of tens of ms, the order of a 7B model's on an H100; --scale tiny: the
models of benchmarks/scheduling.py, 5 ms steps) on one colocated CPU instance of
`aegaeon.instance.node.Node` (public API only: construct, submit, completed, close), requests
submitted at their arrival times. The node profiles the model shapes on this machine into
.bench/profiles.json when it starts.

Simulated: the same requests (the arrival times, prompt lengths and output lengths the node
recorded) through `aegaeon.sim` with the profiles just measured, on a simulated single colocated
instance with the same KV size. The simulated scheduler plans with what the live one plans with
(the engine profiles); the simulated clock runs on the `--profiles` latency model. Both sides are
scored by `slo_report` with the same SLOs.

Agreement is the relative difference of SLO attainment (the paper's mean QoS score) and of mean TTFT.

Profiles (--profiles): "engine" uses what the node measured of `engine.step()` alone (as `aegaeon
profile` does); "loop" fits the same formulas to the timelines of a separate calibration run of the
live node (another seed), so the instance loop's own per-step costs (process hand-offs, delivering
outputs) are in the latency model too. Both are "profiles measured on this machine".
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from live_workload import (
    DRAIN_S,
    MODEL_MAX_POSITION,
    PROFILE_PATH,
    SCALES,
    SMALL,
    LiveScale,
    live_models,
    workload,
)

from aegaeon.config import MIB, EngineConfig, MemoryConfig, NodeConfig, SchedulerConfig
from aegaeon.engine.architecture import Architecture
from aegaeon.engine.kv_cache import kv_block_bytes
from aegaeon.engine.residency import weight_bytes
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.weights import parse_dtype
from aegaeon.instance.node import Node
from aegaeon.scheduler.models import ModelSpec
from aegaeon.scheduler.predictor import Profile, ProfileStore, fit_profile
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.slo import slo_report
from aegaeon.sim.cluster import ClusterConfig, NodeLayout
from aegaeon.sim.cluster import MemoryConfig as SimMemoryConfig
from aegaeon.sim.models import ModelSet
from aegaeon.sim.runner import SimOptions, simulate
from aegaeon.sim.workload import Arrival

DTYPE = "float32"
SEED = 1
CALIBRATION_SEED = 101
# Requests/s per model of the calibration run: a moderate load for each scale, so the turns it fits
# span several batch sizes without queues growing.
CALIBRATION_RATES = {"tiny": 3.0, "small": 0.75}
AGREEMENT = 0.15


def validation_models(count: int, scale: LiveScale) -> dict[str, Path]:
    return live_models("simval", count, scale)


def node_config(scale: LiveScale) -> NodeConfig:
    return NodeConfig(
        profile_path=str(PROFILE_PATH),
        engine=EngineConfig(kv_cache_bytes=scale.kv_bytes),
        memory=MemoryConfig(host_kv_pool_bytes=8 * scale.kv_bytes, kv_slab_bytes=16 * MIB),
        scheduler=SchedulerConfig(default_slo=scale.slo),
    )


def run_real(
    models: dict[str, Path], requests, duration: float, scale: LiveScale
) -> tuple[list[SchedRequest], float, dict]:
    """Replay the requests on a real node; every request as seen by its callbacks, the horizon, timelines.

    Requests are timed on this script's clock (submission, each token's callback), so requests still
    unfinished at the cut are scored too (late from their deadline to the cut).
    """
    done = threading.Semaphore(0)
    records: list[SchedRequest] = []
    with Node(models, node_config(scale), progress=False) as node:
        start = time.monotonic()

        def clock() -> float:
            return time.monotonic() - start

        for index, (arrival, model, prompt, output_tokens) in enumerate(requests):
            delay = arrival - clock()
            if delay > 0:
                time.sleep(delay)
            record = SchedRequest(f"v{index}", model, clock(), len(prompt), output_tokens)
            records.append(record)

            def on_output(output, record: SchedRequest = record) -> None:
                now = clock()
                for _ in output.outputs[0].token_ids if output.outputs else []:
                    if not record.done:
                        record.record_token(now)
                if output.finished:
                    record.finish(now)
                    done.release()

            def on_error(error, record: SchedRequest = record) -> None:
                record.fail(clock())
                done.release()

            params = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True)
            node.submit(prompt, params, model, on_output, on_error, request_id=record.request_id)
        deadline = start + duration + DRAIN_S
        for _ in requests:
            if not done.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                break
        horizon = clock()
        timelines = node.timelines()
    return records, horizon, timelines


def model_specs(models: dict[str, Path]) -> dict[str, ModelSpec]:
    """What the scheduler knows of each model, computed the way the node computes it."""
    dtype = parse_dtype(DTYPE)
    specs = {}
    for name, path in models.items():
        arch = Architecture.from_pretrained(path)
        specs[name] = ModelSpec(
            name, arch.shape_key, weight_bytes(arch, dtype), kv_block_bytes(arch, dtype), MODEL_MAX_POSITION
        )
    return specs


def engine_profiles(specs: dict[str, ModelSpec]) -> dict[str, Profile]:
    """The profiles the node measured of engine.step() when it started."""
    store = ProfileStore.load(PROFILE_PATH)
    profiles = {}
    for name, spec in specs.items():
        profile = store.get(spec.shape_key, DTYPE, "cpu")
        if profile is None:
            raise SystemExit(
                f"{PROFILE_PATH} has no profile for {spec.shape_key}: the node should have made it"
            )
        profiles[name] = profile
    return profiles


def loop_profiles(
    models: dict[str, Path], specs: dict[str, ModelSpec], duration: float, scale: LiveScale
) -> dict[str, Profile]:
    """Profiles fitted to a calibration run of the live node: its prefills, decode turns and loads."""
    requests = workload(list(models), CALIBRATION_RATES[scale.name], duration, CALIBRATION_SEED)
    completed, _, timelines = run_real(models, requests, duration, scale)
    lengths = {r.request_id: (r.prompt_len, r.max_tokens) for r in completed}
    fallback = engine_profiles(specs)
    profiles = {}
    for name, spec in specs.items():
        events = [e for t in timelines.values() for e in t.events if e.model == name]
        prefill = [
            ([lengths[e.request_ids[0]][0]], e.duration_s)
            for e in events
            if e.kind.value == "prefill" and e.request_ids and e.request_ids[0] in lengths
        ]
        decode = []
        for e in events:
            members = [lengths[i] for i in e.request_ids if i in lengths]
            if e.kind.value == "decode_turn" and e.tokens >= 2 and members:
                # Contexts are not in the timeline: take each member halfway through its output.
                decode.append(([p + m // 2 for p, m in members], e.duration_s / e.tokens))
        loads = sorted(e.duration_s for e in events if e.kind.value == "switch" and e.detail == "loaded")
        switch_s = loads[len(loads) // 2] if loads else fallback[name].switch_s
        if len(prefill) < 3 or len(decode) < 3:
            profiles[name] = fallback[name]
            continue
        profiles[name] = fit_profile(spec.shape_key, DTYPE, "cpu", prefill, decode, switch_s)
    return profiles


def run_sim(
    model_set: ModelSet, real: list[SchedRequest], horizon: float, scale: LiveScale
) -> tuple[list[SchedRequest], float]:
    """The requests the node saw (arrival, prompt, output), through the simulator."""
    arrivals = [Arrival(r.arrival_s, r.model, r.prompt_len, r.max_tokens) for r in real]
    cluster = ClusterConfig((NodeLayout(colocated=1),), SimMemoryConfig(kv_bytes=scale.kv_bytes))
    last = max(a.arrival_s for a in arrivals)
    options = SimOptions(drain_s=max(horizon - last, 0.0))  # cut where the real run was cut
    result = simulate("aegaeon", arrivals, model_set, cluster, node_config(scale).scheduler, options)
    return result.requests, result.horizon_s


def relative(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(a), 1e-12)


def validate(
    models: dict[str, Path], model_set: ModelSet, rate: float, duration: float, scale: LiveScale
) -> dict:
    requests = workload(list(models), rate, duration, SEED)
    scheduler = node_config(scale).scheduler
    real, real_horizon, _ = run_real(models, requests, duration, scale)
    simulated, sim_horizon = run_sim(model_set, real, real_horizon, scale)
    real_report = slo_report(real, scheduler, horizon_s=real_horizon)
    sim_report = slo_report(simulated, scheduler, horizon_s=sim_horizon)
    figures = {}
    for key in ("attainment", "stall_attainment", "strict_attainment", "mean_ttft_s"):
        figures[key] = {
            "real": getattr(real_report, key),
            "sim": getattr(sim_report, key),
            "relative_difference": relative(getattr(real_report, key), getattr(sim_report, key)),
        }
    figures["tbt_p50_s"] = {"real": real_report.tbt_s["p50"], "sim": sim_report.tbt_s["p50"]}
    agree = all(figures[k]["relative_difference"] <= AGREEMENT for k in ("attainment", "mean_ttft_s"))
    return {
        "rate": rate,
        "submitted": len(requests),
        "real_finished": real_report.num_finished,
        "figures": figures,
        "agree_within_15pct": agree,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals per run")
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0], help="req/s per model"
    )
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument(
        "--scale", choices=tuple(SCALES), default=SMALL.name, help="model size, KV space and SLOs (small)"
    )
    parser.add_argument(
        "--profiles", choices=("engine", "loop"), default="loop", help="the simulator's latency model (loop)"
    )
    args = parser.parse_args()
    scale = SCALES[args.scale]
    models = validation_models(args.models, scale)
    specs = model_specs(models)
    if args.profiles == "loop":
        profiles = loop_profiles(models, specs, args.duration, scale)
    else:
        with Node(models, node_config(scale), progress=False):
            pass  # the node measures any shape missing from the profile file when it starts
        profiles = engine_profiles(specs)
    # The simulated scheduler plans with what the real node's scheduler plans with.
    model_set = ModelSet(specs, profiles, planning_profiles=engine_profiles(specs))
    results = [validate(models, model_set, rate, args.duration, scale) for rate in args.rates]
    if args.json:
        fitted = {name: p.to_dict() for name, p in profiles.items()}
        summary = {"slo": scale.slo.__dict__, "scale": scale.name, "models": args.models}
        summary["profiles"] = args.profiles
        print(json.dumps({**summary, "fitted": fitted, "runs": results}))
        return
    print(
        f"{args.models} {scale.name} models, one colocated CPU instance, {args.profiles} profiles, "
        f"TTFT {scale.slo.ttft_s} s, TBT {scale.slo.tbt_s} s"
    )
    print(
        f"{'rate':>6}{'requests':>9}{'attain real':>12}{'sim':>8}{'diff':>7}"
        f"{'TTFT real':>11}{'sim':>8}{'diff':>7}"
        f"{'strict real':>12}{'sim':>8}{'agree':>7}"
    )
    for r in results:
        f = r["figures"]
        print(
            f"{r['rate']:>6g}{r['submitted']:>9}{f['attainment']['real']:>12.1%}{f['attainment']['sim']:>8.1%}"
            f"{f['attainment']['relative_difference']:>7.1%}{f['mean_ttft_s']['real']:>11.3f}"
            f"{f['mean_ttft_s']['sim']:>8.3f}{f['mean_ttft_s']['relative_difference']:>7.1%}"
            f"{f['strict_attainment']['real']:>12.1%}{f['strict_attainment']['sim']:>8.1%}"
            f"{'yes' if r['agree_within_15pct'] else 'no':>7}"
        )


if __name__ == "__main__":
    main()
