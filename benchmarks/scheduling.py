"""Token-level scheduling against request-level switching, live on this machine's CPU.

    python benchmarks/scheduling.py [--json] [--duration 30] [--rates 0.5 1 2] [--models 4]
    python benchmarks/scheduling.py --turns [--json] [--duration 30] [--rates 2 4] [--models 2]
    python benchmarks/scheduling.py --predictions [--json] [--duration 30] [--rates 0.5 1 2] [--models 4]

Part 1, SLO attainment. Several tiny models share one colocated CPU instance; requests arrive as a
Poisson process per model. The same workload (same seed) runs twice, side by side:
- token: aegaeon's scheduler (grouped-FCFS prefill, weighted round-robin decode, token-level
  switching);
- request: request-level switching, the baseline: the loaded model serves its requests until none
  is left, then the model of the oldest waiting request is loaded.
Reported per rate: SLO attainment (the paper's QoS score, mean over requests; a load is sustained
when it is >= 90%), the every-stall-charged score, the stricter share of requests that met TTFT and
every TBT, and the mean TTFT. The SLOs are scaled to these tiny models the way the paper's are to 7B
models: the paper's TTFT (10 s) is about 1.4 requests' length and its TBT (100 ms) 4 decode steps;
here a request lasts about 0.5 s and a step about 5 ms.

Part 1b (`--turns`), turn lengths with resident models. The models all fit the arena, so a switch
costs milliseconds; the same workload runs under the default quotas and under the paper's alpha floor
alone (`max_switch_share` 0.999: the floor never gives way), side by side. Reported: mean decode
steps per turn, KV swaps (in and out) per generated token, attainment.

Part 1c (`--predictions`), the predictor against the clock. The same workload under aegaeon's
scheduler; every engine step the instance runs is timed (the instance's call of its engine, as the
scheduler sees it) beside what the node's predictor said it would take: a decode step by the batch's
context lengths, a prefill by its prompt's length. Reported per rate and kind: steps, mean and median
relative error |predicted - measured| / measured, the share of steps within 15%, and the mean signed
error (a bias). Step times on a shared machine are noisy; the median is the steadier figure.

Part 2, scheduler overhead. The 100M-parameter benchmark model decodes 8 requests on a colocated
instance; the share of the decode loop's time spent outside `engine.step()` is the scheduler's own
overhead per decode step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from live_workload import BENCH_DIR, DRAIN_S, KV_BYTES, PROFILE_PATH, SCALED_SLO, live_models, workload

from aegaeon.config import (
    DEFAULT_MAX_SWITCH_SHARE,
    MIB,
    EngineConfig,
    MemoryConfig,
    NodeConfig,
    SchedulerConfig,
)
from aegaeon.demo import ensure_benchmark_model
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.instance.instance import Instance
from aegaeon.instance.node import Node
from aegaeon.scheduler.slo import slo_report
from aegaeon.scheduler.turn_loop import Prefill, Step

SEED = 0
# The paper's floor alone: switches may take up to 99.9% of a round before it gives way.
PAPER_FLOOR_SHARE = 0.999
OVERHEAD_BATCH = 8
OVERHEAD_TOKENS = 96
# A step's prediction counts as accurate within this relative error of its measured time.
PREDICTION_TOLERANCE = 0.15


@dataclass(frozen=True)
class StepTiming:
    kind: str  # "decode" or "prefill"
    model: str
    batch: int
    predicted_s: float
    measured_s: float

    @property
    def relative_error(self) -> float:
        return abs(self.predicted_s - self.measured_s) / self.measured_s


class StepRecorder:
    """Times every engine step a node's instances run, beside the node's prediction for it.

    It wraps each instance's command execution and its engine's `step` (observing, not replacing
    them): a `Step` command is one engine step, predicted by the batch's context lengths; a `Prefill`
    is the engine steps up to the prompt's first token, predicted by its length.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.steps: list[StepTiming] = []
        for instance in node.instances:
            self._observe(instance)

    def _observe(self, instance: Instance) -> None:
        execute, engine = instance._execute, instance.engine
        engine_step = engine.step
        stepped: list[float] = []  # seconds of each engine step of the command under way

        def step():
            start = time.perf_counter()
            try:
                return engine_step()
            finally:
                stepped.append(time.perf_counter() - start)

        def observed(command):
            predictor = self.node.predictor
            if type(command) is Step:
                batch = [r.context_len for r in command.requests]
                kind, model, predicted = "decode", command.model, predictor.decode_s(command.model, batch)
            elif type(command) is Prefill:
                batch = [command.request.prompt_len]
                model = command.request.model
                kind, predicted = "prefill", predictor.prefill_s(model, batch)
            else:
                return execute(command)
            stepped.clear()
            result = execute(command)
            if stepped:
                self.steps.append(StepTiming(kind, model, len(batch), predicted, sum(stepped)))
            return result

        engine.step = step
        instance._execute = observed

    def summary(self) -> dict:
        """Per kind: steps, mean and median relative error, share within tolerance, mean signed error."""
        out = {}
        for kind in ("decode", "prefill"):
            steps = [s for s in self.steps if s.kind == kind]
            if not steps:
                continue
            errors = [s.relative_error for s in steps]
            out[kind] = {
                "steps": len(steps),
                "mean_relative_error": statistics.fmean(errors),
                "median_relative_error": statistics.median(errors),
                "within_tolerance": sum(e <= PREDICTION_TOLERANCE for e in errors) / len(errors),
                "mean_signed_error": statistics.fmean(
                    (s.predicted_s - s.measured_s) / s.measured_s for s in steps
                ),
                "mean_predicted_s": statistics.fmean(s.predicted_s for s in steps),
                "mean_measured_s": statistics.fmean(s.measured_s for s in steps),
            }
        return out


def bench_models(count: int) -> dict[str, Path]:
    return live_models("sched", count)


def replay(node: Node, requests, duration: float) -> None:
    """Submit each request at its arrival time; return when all are done or the drain time is up."""
    done = threading.Semaphore(0)

    def on_output(output) -> None:
        if output.finished:
            done.release()

    start = time.monotonic()
    for arrival, model, prompt, output_tokens in requests:
        delay = arrival - (time.monotonic() - start)
        if delay > 0:
            time.sleep(delay)
        params = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True)
        node.submit(prompt, params, model, on_output, lambda error: done.release())
    deadline = start + duration + DRAIN_S
    for _ in requests:
        if not done.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            break


def run_policy(
    models: dict[str, Path],
    policy: str,
    rate: float,
    duration: float,
    max_switch_share: float = DEFAULT_MAX_SWITCH_SHARE,
) -> dict:
    config = NodeConfig(
        policy=policy,
        profile_path=str(PROFILE_PATH),
        engine=EngineConfig(kv_cache_bytes=KV_BYTES),
        memory=MemoryConfig(host_kv_pool_bytes=256 * MIB, kv_slab_bytes=16 * MIB),
        scheduler=SchedulerConfig(default_slo=SCALED_SLO, max_switch_share=max_switch_share),
    )
    requests = workload(list(models), rate, duration, SEED)
    with Node(models, config, progress=False) as node:
        recorder = StepRecorder(node)
        replay(node, requests, duration)
        horizon = node.now()
        unfinished = [live.sched for live in node.live.values()]
        report = slo_report([*node.completed, *unfinished], config.scheduler, horizon_s=horizon)
        events = [e for instance in node.instances for e in instance.timeline.events]
        switches = sum(1 for e in events if e.kind.value == "switch")
        resident_switches = sum(1 for e in events if e.kind.value == "switch" and e.detail == "resident")
        turns = [e.tokens for e in events if e.kind.value == "decode_turn"]
        swaps = sum(1 for e in events if e.kind.value in ("swap_in", "swap_out"))
        generated = sum(r.generated for r in [*node.completed, *unfinished])
    return {
        "requests": len(requests),
        "finished": report.num_finished,
        "attainment": report.attainment,
        "stall_attainment": report.stall_attainment,
        "strict_attainment": report.strict_attainment,
        "mean_ttft_s": report.mean_ttft_s,
        "tbt_p50_s": report.tbt_s["p50"],
        "tbt_p99_s": report.tbt_s["p99"],
        "switches": switches,
        "resident_switches": resident_switches,
        "turns": len(turns),
        "steps_per_turn": sum(turns) / len(turns) if turns else None,
        "swaps": swaps,
        "generated": generated,
        "swaps_per_token": swaps / generated if generated else None,
        "predictions": recorder.summary(),
    }


def turn_lengths(models: dict[str, Path], rates: list[float], duration: float) -> dict:
    """Default quotas against the paper's floor alone, same workload, each rate."""
    shares = {"default": DEFAULT_MAX_SWITCH_SHARE, "paper floor": PAPER_FLOOR_SHARE}
    return {
        str(rate): {
            name: run_policy(models, "token", rate, duration, share) for name, share in shares.items()
        }
        for rate in rates
    }


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_turns(results: dict) -> None:
    columns = ("rate/model", "quotas", "turns", "steps/turn", "swaps/token", "attain", "stall", "switches")
    print(" ".join(f"{c:>12}" for c in columns))
    for rate, by_quota in results.items():
        for name, r in by_quota.items():
            print(
                f"{rate:>12} {name:>12} {r['turns']:>12} {_num(r['steps_per_turn'], '.1f'):>12} "
                f"{_num(r['swaps_per_token'], '.3f'):>12} {r['attainment']:>12.1%} "
                f"{r['stall_attainment']:>12.1%} "
                f"{r['switches']:>7} ({r['resident_switches']} resident)"
            )


def predictions(models: dict[str, Path], rates: list[float], duration: float) -> dict:
    """The token-level scheduler's runs, each rate: how close the predictor came to each step."""
    return {str(rate): run_policy(models, "token", rate, duration) for rate in rates}


def print_predictions(results: dict) -> None:
    columns = (
        "rate/model",
        "kind",
        "steps",
        "mean err",
        "median err",
        "within 15%",
        "bias",
        "pred ms",
        "meas ms",
    )
    print(" ".join(f"{c:>10}" for c in columns))
    for rate, r in results.items():
        for kind, p in r["predictions"].items():
            print(
                f"{rate:>10} {kind:>10} {p['steps']:>10} {p['mean_relative_error']:>10.1%} "
                f"{p['median_relative_error']:>10.1%} {p['within_tolerance']:>10.1%} "
                f"{p['mean_signed_error']:>+10.1%} {p['mean_predicted_s'] * 1e3:>10.2f} "
                f"{p['mean_measured_s'] * 1e3:>10.2f}"
            )


def scheduler_overhead() -> dict:
    """Share of the decode loop outside engine.step(), 8 requests of the 100M model."""
    model = ensure_benchmark_model(BENCH_DIR / "llama-100m")
    config = NodeConfig(profile_path=str(PROFILE_PATH), engine=EngineConfig(kv_cache_bytes=256 * MIB))
    with Node({"llama-100m": model}, config, progress=False) as node:
        finished = threading.Semaphore(0)
        params = SamplingParams(temperature=0, max_tokens=OVERHEAD_TOKENS, ignore_eos=True)
        for index in range(OVERHEAD_BATCH):
            prompt = [1 + index, 2, 3, 4, 5, 6, 7, 8]
            node.submit(prompt, params, "llama-100m", lambda o: o.finished and finished.release())
        for _ in range(OVERHEAD_BATCH):
            finished.acquire()
        instance = node.instances[0]
        loop, step = instance.decode_loop_s, instance.decode_step_s
    return {"batch": OVERHEAD_BATCH, "loop_s": loop, "step_s": step, "overhead": (loop - step) / loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per run")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="req/s per model")
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--turns", action="store_true", help="turn lengths with resident models only")
    parser.add_argument(
        "--predictions", action="store_true", help="predicted against measured step times only"
    )
    args = parser.parse_args()

    models = bench_models(args.models)
    if args.predictions:
        results = predictions(models, args.rates, args.duration)
        if args.json:
            print(json.dumps({"models": args.models, "rates": results}))
            return
        print(f"{args.models} models, one colocated CPU instance, aegaeon's scheduler")
        print_predictions(results)
        return
    if args.turns:
        turns = turn_lengths(models, args.rates, args.duration)
        if args.json:
            print(json.dumps({"slo": SCALED_SLO.__dict__, "models": args.models, "rates": turns}))
            return
        print(
            f"{args.models} models resident, one colocated CPU instance, TTFT {SCALED_SLO.ttft_s} s, "
            f"TBT {SCALED_SLO.tbt_s} s"
        )
        print_turns(turns)
        return
    results = {"slo": SCALED_SLO.__dict__, "models": args.models, "rates": {}}
    for rate in args.rates:
        results["rates"][str(rate)] = {
            policy: run_policy(models, policy, rate, args.duration) for policy in ("token", "request")
        }
    results["scheduler_overhead"] = scheduler_overhead()
    if args.json:
        print(json.dumps(results))
        return
    slo = f"TTFT {SCALED_SLO.ttft_s} s, TBT {SCALED_SLO.tbt_s} s"
    print(f"{args.models} models, one colocated CPU instance, {slo}")
    columns = (
        "rate/model",
        "policy",
        "requests",
        "attain",
        "stall",
        "strict",
        "TTFT s",
        "TBT p50",
        "TBT p99",
        "switches",
    )
    print(" ".join(f"{c:>10}" for c in columns))
    for rate, by_policy in results["rates"].items():
        for policy, r in by_policy.items():
            print(
                f"{rate:>10} {policy:>10} {r['requests']:>10} {r['attainment']:>10.1%} "
                f"{r['stall_attainment']:>10.1%} "
                f"{r['strict_attainment']:>10.1%} {r['mean_ttft_s']:>10.3f} {r['tbt_p50_s']:>10.3f} "
                f"{r['tbt_p99_s']:>10.3f} {r['switches']:>10}"
            )
    o = results["scheduler_overhead"]
    print(f"scheduler overhead per decode step, batch {o['batch']}, 100M model: {o['overhead']:.1%}")


if __name__ == "__main__":
    main()
