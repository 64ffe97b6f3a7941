"""mux: static spatial multiplexing in the style of MuxServe: several models share a GPU for good.

Placement is decided once, before the workload: models in order of demand (rate times size) go to
the GPU with the least demand so far among those whose memory still holds the model's weights while
keeping `min_kv_fraction` of the arena for KV. A model that fits nowhere is not served (its requests
fail): GPU memory is the limit this policy lives with. On a GPU the colocated models' iterations
interleave (prefill first, decode steps round-robin over models, batching.py) over one shared KV
pool, with every model always loaded: no switches.

What it ignores: MuxServe runs prefill and decode of different models concurrently on partitioned
SMs. Decode is bound by memory bandwidth, and every model streams its own weights, so running two
decode steps at once takes about as long as running them in turn; the approximation favours neither.
"""

from __future__ import annotations

from dataclasses import dataclass

from aegaeon.scheduler.request import SchedRequest
from aegaeon.sim.policies.base import Deployment, SimContext, model_load, total_busy_s
from aegaeon.sim.policies.batching import BatchingEngine

DEFAULT_MIN_KV_FRACTION = 0.2


@dataclass(frozen=True)
class MuxOptions:
    # Share of each GPU's arena kept for KV: weights may fill the rest.
    min_kv_fraction: float = DEFAULT_MIN_KV_FRACTION

    def __post_init__(self) -> None:
        if not 0 < self.min_kv_fraction < 1:
            raise ValueError(f"min_kv_fraction must be in (0, 1), got {self.min_kv_fraction}")


def place_models(
    loads: dict[str, float], weights: dict[str, int], gpus: int, weight_room: int
) -> list[list[str]]:
    """Models per GPU: in order of demand, each to the least-loaded GPU with room for its weights."""
    placed: list[list[str]] = [[] for _ in range(gpus)]
    used = [0] * gpus
    demand = [0.0] * gpus
    for model in sorted(loads, key=lambda m: (-loads[m], m)):
        fitting = [g for g in range(gpus) if used[g] + weights[model] <= weight_room]
        if not fitting:
            continue
        gpu = min(fitting, key=lambda g: (demand[g], used[g], g))
        placed[gpu].append(model)
        used[gpu] += weights[model]
        demand[gpu] += loads[model]
    return placed


class MuxDeployment(Deployment):
    def __init__(self, context: SimContext, options: MuxOptions = MuxOptions()) -> None:
        self.loop = context.loop
        models, cluster = context.models, context.cluster
        arena = cluster.memory.arena_bytes(models.largest_weight_bytes())
        loads = {m: model_load(models, context.rates, m) for m in models}
        weights = {m: models.weight_bytes(m) for m in models}
        room = int(arena * (1 - options.min_kv_fraction))
        self.placement = place_models(loads, weights, cluster.engines, room)
        self.engine_of: dict[str, BatchingEngine] = {}
        self.engines: list[BatchingEngine] = []
        for index, placed in enumerate(self.placement):
            engine = BatchingEngine(
                f"gpu{index}", self.loop, models, arena, cluster.max_batch_size, cluster.max_batched_tokens
            )
            if placed:
                engine.load(placed, 0.0)
            self.engines.append(engine)
            self.loop.spawn(engine.run())
            for model in placed:
                self.engine_of[model] = engine
        self._gpus, self._tp = cluster.gpus, cluster.tensor_parallel_size
        self.unserved = sorted(set(models) - set(self.engine_of))

    def submit(self, request: SchedRequest) -> None:
        engine = self.engine_of.get(request.model)
        if engine is None:
            request.fail(self.loop.now)
            return
        engine.add(request)

    def busy_s(self) -> dict[str, float]:
        return total_busy_s(self.engines, self._tp)

    @property
    def gpus(self) -> int:
        return self._gpus

    def notes(self) -> dict:
        return {
            "models_served": len(self.engine_of),
            "models_unserved": len(self.unserved),
            "max_models_per_gpu": max((len(p) for p in self.placement), default=0),
        }


def build(context: SimContext, options: MuxOptions = MuxOptions()) -> MuxDeployment:
    return MuxDeployment(context, options)
