"""dedicated: each model owns whole GPUs, as when every model gets its own vLLM deployment.

Models are ranked by demand (request rate times size); with fewer GPUs than models only the first
ones get a GPU and the requests of the rest fail (that is what "no GPU of its own" means). Spare GPUs
become extra replicas of the model with the most demand per replica; a request goes to the replica
with the fewest requests. Each GPU runs continuous batching (batching.py) with its one model always
loaded: no switches, no loads after start.
"""

from __future__ import annotations

from collections import defaultdict

from aegaeon.scheduler.request import SchedRequest
from aegaeon.sim.policies.base import Deployment, SimContext, model_load, total_busy_s
from aegaeon.sim.policies.batching import BatchingEngine


def assign_gpus(loads: dict[str, float], gpus: int) -> dict[str, int]:
    """GPUs per model: one each for the most demanding models, spares to the most loaded per replica."""
    ranked = sorted(loads, key=lambda m: (-loads[m], m))
    replicas = {model: 1 for model in ranked[:gpus]}
    for _ in range(gpus - len(replicas)):
        busiest = max(replicas, key=lambda m: (loads[m] / replicas[m], m))
        replicas[busiest] += 1
    return replicas


class DedicatedDeployment(Deployment):
    def __init__(self, context: SimContext) -> None:
        self.loop = context.loop
        models, cluster = context.models, context.cluster
        loads = {m: model_load(models, context.rates, m) for m in models}
        self.replicas = assign_gpus(loads, cluster.engines)
        self.engines: dict[str, list[BatchingEngine]] = defaultdict(list)
        for model, count in self.replicas.items():
            arena = cluster.memory.arena_bytes(models.largest_weight_bytes())
            for index in range(count):
                engine = BatchingEngine(
                    f"{model}/{index}",
                    self.loop,
                    models,
                    arena,
                    cluster.max_batch_size,
                    cluster.max_batched_tokens,
                )
                engine.load([model], 0.0)  # loaded before the workload starts
                self.engines[model].append(engine)
                self.loop.spawn(engine.run())
        self._gpus = cluster.gpus
        self._tp = cluster.tensor_parallel_size
        self.unserved = sorted(set(models) - set(self.replicas))

    def submit(self, request: SchedRequest) -> None:
        replicas = self.engines.get(request.model)
        if not replicas:
            request.fail(self.loop.now)
            return
        min(replicas, key=lambda e: e.requests()).add(request)

    def busy_s(self) -> dict[str, float]:
        return total_busy_s((engine for replicas in self.engines.values() for engine in replicas), self._tp)

    @property
    def gpus(self) -> int:
        return self._gpus

    def notes(self) -> dict:
        return {"models_served": len(self.replicas), "models_unserved": len(self.unserved)}


def build(context: SimContext) -> DedicatedDeployment:
    return DedicatedDeployment(context)
