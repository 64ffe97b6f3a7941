"""serverless: request-level auto-scaling in the style of ServerlessLLM.

A GPU holds one model at a time. A request goes to an instance of its model that has room (batch cap
and KV), loading or serving; otherwise it waits, first come first served, for a GPU: an empty one,
or else one whose instance has been idle for at least `keep_alive_s` (the longest idle first). Loading
takes the model's weights over the host link (the profile's switch time) plus `startup_s`, the engine
start beyond the weight copy. A request not started (its prefill not begun) within `timeout_s` of
arriving fails, as in ServerlessLLM's setup.

ServerlessLLM builds a new vLLM engine for every instance it scales up, so each load pays vLLM's
engine start. The default `startup_s` is the measured start of an eager engine (see
DEFAULT_STARTUP_S); `startup_s=0` models an ideal request-level scheduler whose scale-up is only
the weight copy.
What it models generously: checkpoints are always in host memory (ServerlessLLM's fastest tier), the
engine skips torch.compile and CUDA graph capture, and with the default keep-alive of 0 an idle
instance stays loaded, warm for its model's next request, until another model needs the GPU.
What it ignores: live migration of running requests between GPUs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from aegaeon.scheduler.request import SchedRequest
from aegaeon.sim.policies.base import Deployment, SimContext, total_busy_s
from aegaeon.sim.policies.batching import BatchingEngine

DEFAULT_TIMEOUT_S = 15.0
DEFAULT_KEEP_ALIVE_S = 0.0
# vLLM's engine start beyond loading the weights, every cache warm, less what an eager engine skips
# (torch.compile and CUDA graph capture): 12.8 s for Llama-2-7B and Qwen-7B, 13.1 s for Yi-9B, 15.3 s
# for Llama-2-13B. Measured with vLLM 0.10.1 on an A100, mean of 5 runs: Kabakibo et al., "Breaking
# the Ice: Analyzing Cold Start Latency in vLLM", MLSys 2026; their data is in the repository
# upb-cn/vllm-startup-profiler, experiments/A100/examples/model_size. The start is CPU-bound, so a
# faster GPU does not shorten it. The smallest of the four, for every model; docs/simulation.md.
DEFAULT_STARTUP_S = 13.0


@dataclass(frozen=True)
class ServerlessOptions:
    timeout_s: float = DEFAULT_TIMEOUT_S
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    startup_s: float = DEFAULT_STARTUP_S

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.keep_alive_s < 0 or self.startup_s < 0:
            raise ValueError("keep_alive_s and startup_s must be >= 0")


class ServerlessDeployment(Deployment):
    def __init__(self, context: SimContext, options: ServerlessOptions = ServerlessOptions()) -> None:
        self.loop = context.loop
        self.models = context.models
        self.options = options
        cluster = context.cluster
        arena = cluster.memory.arena_bytes(self.models.largest_weight_bytes())
        self.engines = [
            BatchingEngine(
                f"gpu{index}",
                self.loop,
                self.models,
                arena,
                cluster.max_batch_size,
                cluster.max_batched_tokens,
                on_idle=self._on_idle,
            )
            for index in range(cluster.engines)
        ]
        for engine in self.engines:
            self.loop.spawn(engine.run())
        self._gpus, self._tp = cluster.gpus, cluster.tensor_parallel_size
        self.queue: deque[SchedRequest] = deque()
        self.timed_out = 0
        self.loads = 0

    def submit(self, request: SchedRequest) -> None:
        self.queue.append(request)
        self.loop.call_at(self.loop.now + self.options.timeout_s, lambda: self._expire(request))
        self._dispatch()

    def _instance_with_room(self, request: SchedRequest) -> BatchingEngine | None:
        for engine in self.engines:
            if engine.loaded == [request.model] and engine.has_room(request):
                return engine
        return None

    def _free_gpu(self) -> BatchingEngine | None:
        now = self.loop.now
        empty = [e for e in self.engines if not e.loaded]
        if empty:
            return empty[0]
        idle = [
            e
            for e in self.engines
            if e.idle() and now >= e.ready_s and now - e.idle_since >= self.options.keep_alive_s
        ]
        return min(idle, key=lambda e: e.idle_since) if idle else None

    def _dispatch(self) -> None:
        """Place waiting requests in arrival order: join an instance, or scale one up on a free GPU."""
        kept: deque[SchedRequest] = deque()
        while self.queue:
            request = self.queue.popleft()
            if request.done:
                continue
            engine = self._instance_with_room(request)
            if engine is None:
                engine = self._free_gpu()
                if engine is None:
                    kept.append(request)
                    continue
                model = request.model
                engine.load([model], self.options.startup_s + self.models.predictor.switch_s(model))
                self.loads += 1
            engine.add(request)
        self.queue = kept

    def _on_idle(self, engine: BatchingEngine) -> None:
        if self.queue:
            self._dispatch()
        elif self.options.keep_alive_s > 0:
            # When the keep-alive runs out the GPU becomes free for whoever waits then.
            self.loop.call_at(self.loop.now + self.options.keep_alive_s, self._dispatch)

    def _expire(self, request: SchedRequest) -> None:
        if request.done or any(request in e.started for e in self.engines):
            return
        if request in self.queue:
            self.queue.remove(request)
        else:
            for engine in self.engines:
                if engine.withdraw(request):
                    break
        request.fail(self.loop.now)
        self.timed_out += 1

    def busy_s(self) -> dict[str, float]:
        return total_busy_s(self.engines, self._tp)

    @property
    def gpus(self) -> int:
        return self._gpus

    def notes(self) -> dict:
        return {"timed_out": self.timed_out, "model_loads": self.loads}


def build(context: SimContext, options: ServerlessOptions = ServerlessOptions()) -> ServerlessDeployment:
    return ServerlessDeployment(context, options)
