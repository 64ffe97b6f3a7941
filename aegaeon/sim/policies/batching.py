"""A GPU running request-level continuous batching (vLLM-style), the engine under every baseline.

Each iteration is either a prefill of waiting requests (first come, first served, one model per
batch, up to the token budget, the batch-size cap and the KV left) or, when none can start, one decode
step of the running requests of one model (models take turns, round-robin). A request reserves KV for
its whole sequence when it starts, so nothing is ever preempted. Several models can be loaded at once
(MuxServe-style colocation); their weights and the KV share the device.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable

from aegaeon.scheduler.request import SchedRequest
from aegaeon.sim.events import EventLoop, Process, Signal
from aegaeon.sim.models import ModelSet


class BatchingEngine:
    """One device, its loaded models, their waiting and running requests."""

    def __init__(
        self,
        name: str,
        loop: EventLoop,
        models: ModelSet,
        arena_bytes: int,
        max_batch_size: int,
        max_batched_tokens: int,
        on_idle: Callable[[BatchingEngine], None] | None = None,
    ) -> None:
        self.name = name
        self.loop = loop
        self.models = models
        self.arena_bytes = arena_bytes
        self.max_batch_size = max_batch_size
        self.max_batched_tokens = max_batched_tokens
        self.on_idle = on_idle
        self.loaded: list[str] = []
        self.ready_s = 0.0  # when the loaded weights have landed
        self.waiting: deque[SchedRequest] = deque()
        self.running: dict[str, list[SchedRequest]] = defaultdict(list)
        # The batch being prefilled now (neither waiting nor running while its prefill runs).
        self.prefilling: list[SchedRequest] = []
        self.started: set[SchedRequest] = set()
        self._reserved: dict[SchedRequest, int] = {}
        self.kv_used = 0
        self.idle_since = 0.0
        self.busy_s: dict[str, float] = defaultdict(float)
        self.wake = Signal(loop)
        self._turn = 0

    # -- memory and admission ------------------------------------------------------------------------

    @property
    def kv_bytes(self) -> int:
        """KV room: the arena less the loaded weights."""
        return self.arena_bytes - sum(self.models.weight_bytes(m) for m in self.loaded)

    def kv_need(self, request: SchedRequest) -> int:
        spec = self.models.specs[request.model]
        return spec.kv_bytes(min(request.final_len, spec.max_model_len))

    def requests(self) -> int:
        return len(self.waiting) + len(self.prefilling) + sum(len(r) for r in self.running.values())

    def idle(self) -> bool:
        return not self.requests()

    def has_room(self, request: SchedRequest) -> bool:
        """Whether `request` could join now: batch cap and KV, counting what already waits here."""
        if self.requests() + 1 > self.max_batch_size:
            return False
        waiting_kv = sum(self.kv_need(r) for r in self.waiting)
        return self.kv_used + waiting_kv + self.kv_need(request) <= self.kv_bytes

    def load(self, models: list[str], seconds: float) -> None:
        """Replace the loaded models; they are ready `seconds` from now."""
        if self.requests():
            raise RuntimeError(f"{self.name}: cannot change models while serving requests")
        self.loaded = list(models)
        self.ready_s = self.loop.now + seconds
        self.busy_s["load"] += seconds
        if self.kv_bytes < 1:
            raise ValueError(f"{self.name}: models {models} leave no KV room on the device")
        self.wake.notify_all()

    def add(self, request: SchedRequest) -> None:
        self.waiting.append(request)
        self.wake.notify_all()

    def withdraw(self, request: SchedRequest) -> bool:
        """Take back a request that has not started; True if it was waiting here."""
        try:
            self.waiting.remove(request)
        except ValueError:
            return False
        return True

    def _admit(self) -> list[SchedRequest]:
        """Start the next prefill batch: waiting requests of the oldest one's model that fit."""
        batch: list[SchedRequest] = []
        model = None
        tokens = 0
        running = sum(len(r) for r in self.running.values())
        kept: deque[SchedRequest] = deque()
        while self.waiting:
            request = self.waiting.popleft()
            if request.done:  # failed while it waited
                continue
            need = self.kv_need(request)
            fits = (
                (model is None or request.model == model)
                and running + len(batch) < self.max_batch_size
                and self.kv_used + need <= self.kv_bytes
                and (not batch or tokens + request.prompt_len <= self.max_batched_tokens)
            )
            if not fits:
                kept.append(request)
                if model is None:  # the oldest cannot start: first come, first served
                    break
                continue
            model = request.model
            batch.append(request)
            tokens += request.prompt_len
            self.kv_used += need
            self._reserved[request] = need
            self.started.add(request)
        kept.extend(self.waiting)
        self.waiting = kept
        return batch

    def _release(self, request: SchedRequest) -> None:
        self.kv_used -= self._reserved.pop(request, 0)

    def _next_decode_model(self) -> str | None:
        models = [m for m in self.loaded if self.running.get(m)]
        if not models:
            return None
        self._turn = (self._turn + 1) % len(models)
        return models[self._turn]

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> Process:
        predictor = self.models.predictor
        while True:
            if self.loop.now < self.ready_s:
                yield self.ready_s
            batch = self._admit()
            if batch:
                model = batch[0].model
                start = self.loop.now
                end = start + predictor.prefill_s(model, [r.prompt_len for r in batch])
                self.prefilling = batch
                yield end
                self.prefilling = []
                self.busy_s["prefill"] += end - start
                for request in batch:
                    request.record_token(end)
                    if request.done:
                        self._release(request)
                    else:
                        self.running[model].append(request)
                continue
            model = self._next_decode_model()
            if model is None:
                if self.waiting and not any(self.running.values()):
                    self._fail_unfittable()
                    continue
                self.idle_since = self.loop.now
                if self.on_idle is not None:
                    self.on_idle(self)
                if self.waiting or self.loop.now < self.ready_s:
                    continue
                yield self.wake
                continue
            live = self.running[model]
            start = self.loop.now
            end = start + predictor.decode_s(model, [r.context_len for r in live])
            yield end
            self.busy_s["decode"] += end - start
            for request in live:
                request.record_token(end)
            if any(r.done for r in live):
                for request in live:
                    if request.done:
                        self._release(request)
                self.running[model] = [r for r in live if not r.done]

    def _fail_unfittable(self) -> None:
        """The oldest waiting request cannot start on an empty device: it never will."""
        request = self.waiting.popleft()
        if not request.done:
            request.fail(self.loop.now)
