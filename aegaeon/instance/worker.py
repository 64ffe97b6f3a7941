"""The instance process: one device's engine, driven by its node over ZeroMQ.

The node starts one worker per instance (`python -m aegaeon.instance.worker`, its spec pickled on
stdin). The worker
attaches to the node's shared host model cache and host KV pool, builds its engine (registering every
model once: the node's cache is filled by whichever worker gets there first), binds a REP socket and
answers `Call`s: each names a method of `EngineService` and its arguments, and the `Reply` carries the
result or the exception. Requests, handoffs and outputs are plain picklable records; KV never crosses
the socket, only host-pool block handles do.

A worker exits when asked (`shutdown`) or when its node is gone (its parent changed). With
`tensor_parallel_size` N > 1 the worker is rank 0 of its engine and starts ranks 1..N-1 itself
(engine/parallel/ranks.py); when one of them dies the worker exits at once, without answering, so
its node sees the instance die and restarts it as it would after any crash.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

from aegaeon.config import EngineConfig, MemoryConfig
from aegaeon.portable import portable

# How often an idle worker checks that its node is still alive.
PARENT_CHECK_MS = 1000
# A worker whose tensor-parallel engine lost a rank exits with this code (its node restarts it).
RANK_LOST_EXIT_CODE = 4


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its engine; picklable, sent to the new process."""

    name: str
    models: dict[str, str]
    device: str
    dtype: str
    engine: EngineConfig
    memory: MemoryConfig
    model_cache_name: str
    kv_pool_name: str
    address: str  # the ZeroMQ endpoint the worker binds
    cpu_threads: int | None = None  # torch intra-op threads on a CPU device (None: torch's default)
    progress: bool = False
    devices: tuple[str, ...] = ()  # the node's devices it owns ("cuda:3"); `device` is its local name
    env: dict[str, str] = field(default_factory=dict)  # set in its process's environment (devices.py)
    tensor_parallel_size: int = 1  # ranks (processes, one device each) of this instance's engine


@dataclass(frozen=True)
class ModelFacts:
    """What the node's scheduler and api server need to know of a model an engine registered."""

    name: str
    model_dir: str
    cache_key: str  # its key in the node's host model cache
    shape_key: str
    num_parameters: int
    vocab_size: int
    weight_bytes: int
    kv_block_bytes: int
    max_model_len: int


@dataclass(frozen=True)
class WorkerInfo:
    """An instance's engine as its node sees it."""

    pid: int
    device: str  # "cpu", "cuda:0"
    device_name: str  # how profiles name the device: "cpu" or the GPU's model
    dtype: str
    arena_bytes: int
    kv_bytes: int
    models: dict[str, ModelFacts] = field(default_factory=dict)


@dataclass(frozen=True)
class SwitchResult:
    """A switch that happened: whether weights were copied (False: the model was resident)."""

    loaded: bool


@dataclass(frozen=True)
class Call:
    method: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Reply:
    value: Any = None
    error: BaseException | None = None


class EngineService:
    """The engine operations an instance loop needs, each one call across the process boundary."""

    def __init__(self, engine, kv_pool):
        self.engine = engine
        self.kv_pool = kv_pool
        self.stopping = False

    def info(self) -> WorkerInfo:
        from aegaeon.instance.profiler import device_name

        engine = self.engine
        models = {name: self._facts(served) for name, served in engine.models.items()}
        return WorkerInfo(
            pid=os.getpid(),
            device=str(engine.device),
            device_name=device_name(engine.device),
            dtype=str(engine.dtype).removeprefix("torch."),
            arena_bytes=engine.residency.arena.capacity,
            kv_bytes=engine.residency.kv_bytes,
            models=models,
        )

    def _facts(self, served) -> ModelFacts:
        from aegaeon.engine.kv_cache import kv_block_bytes

        return ModelFacts(
            name=served.name,
            model_dir=str(served.model_dir),
            cache_key=served.cache_key,
            shape_key=served.shape_key,
            num_parameters=served.model_arch.num_parameters(),
            vocab_size=served.arch.vocab_size,
            weight_bytes=served.weight_bytes,
            kv_block_bytes=kv_block_bytes(served.arch, self.engine.dtype),
            max_model_len=served.max_model_len,
        )

    def register(self, name: str, path: str, pinned: bool = False) -> ModelFacts:
        """Serve one more model (read into the host model cache when first needed, or now if pinned)."""
        return self._facts(self.engine.register(name, path, pinned))

    def unregister(self, name: str) -> None:
        self.engine.unregister(name)

    def switch(self, model: str) -> SwitchResult | None:
        """Make `model` active; None if it already was."""
        if self.engine.active is not None and self.engine.active.name == model:
            return None
        self.engine.switch_to(model)
        return SwitchResult(loaded=self.engine.residency.last_switch.loaded)

    def prefetch(self, model: str) -> bool:
        return self.engine.prefetch(model)

    def resident_models(self) -> list[str]:
        """Models whose weights are in the arena now (a switch to them copies nothing)."""
        return [name for name in self.engine.models if self.engine.is_resident(name)]

    def add_request(self, request_id: str, token_ids: list[int], params, model: str) -> None:
        self.engine.add_request(request_id, token_ids, params, model)

    def step(self):
        return self.engine.step()

    def has_unfinished_requests(self, model: str | None = None) -> bool:
        return self.engine.has_unfinished_requests(model)

    def place(self, model: str, batch_ids: set[str]) -> list[str]:
        """Make what the steps of `model` run exactly the batch: others swapped out, the batch in.

        Returns the ids swapped in (KV copied back, or queued to be recomputed).
        """
        requests = self.engine.requests_of(model)
        # Out first: the device blocks they free can take the batch's KV.
        self.engine.swap_out(*(request_id for request_id in requests if request_id not in batch_ids))
        return self.engine.swap_in(*(request_id for request_id in requests if request_id in batch_ids))

    def swap_out(self, request_ids: list[str]) -> None:
        self.engine.swap_out(*request_ids)

    def export_request(self, request_id: str):
        return self.engine.export_request(request_id)

    def import_request(self, handoff) -> None:
        self.engine.import_request(handoff)

    def abort_request(self, request_id: str) -> None:
        self.engine.abort_request(request_id)

    def profile(self, model: str, progress: bool):
        from aegaeon.instance.profiler import profile_model

        return profile_model(self.engine, model, progress)

    def shutdown(self) -> None:
        self.stopping = True


def _build(spec: WorkerSpec):
    import torch

    from aegaeon.engine.engine import LLMEngine
    from aegaeon.instance.devices import bind_to_devices
    from aegaeon.memory.kv_pool import HostKVPool
    from aegaeon.memory.model_cache import HostModelCache

    bind_to_devices(spec.device)  # first: the host regions are pinned in the current GPU's context
    if spec.cpu_threads is not None and torch.device(spec.device).type == "cpu":
        torch.set_num_threads(spec.cpu_threads)
    model_cache = HostModelCache.attach(spec.memory.shm_dir, spec.model_cache_name)
    kv_pool = HostKVPool.attach(spec.memory.shm_dir, spec.kv_pool_name)
    kv_pool.pin()
    common = dict(
        models=spec.models,
        device=spec.device,
        dtype=spec.dtype,
        config=spec.engine,
        memory=spec.memory,
        model_cache=model_cache,
        kv_pool=kv_pool,
        progress=spec.progress,
    )
    if spec.tensor_parallel_size > 1:
        from aegaeon.engine.parallel.lockstep import TensorParallelEngine

        engine = TensorParallelEngine(
            tensor_parallel_size=spec.tensor_parallel_size, cpu_threads=spec.cpu_threads, **common
        )
    else:
        engine = LLMEngine(**common)
    return EngineService(engine, kv_pool)


def serve(spec: WorkerSpec) -> None:
    """The worker process's main: build the engine, then answer calls until shut down."""
    import zmq

    from aegaeon.engine.parallel.ranks import RankFailure

    parent = os.getppid()
    context = zmq.Context()
    socket = context.socket(zmq.REP)
    socket.bind(spec.address)
    # A failed start is reported as the answer to the node's first call, so it sees the real error.
    service, start_error = None, None
    try:
        service = _build(spec)
    except BaseException as error:  # noqa: BLE001 - sent to the node, which raises it
        traceback.print_exc(file=sys.stderr)
        start_error = portable(error)
    try:
        while True:
            if not socket.poll(PARENT_CHECK_MS):
                if os.getppid() != parent:
                    return  # the node is gone: nobody will call again
                continue
            call: Call = socket.recv_pyobj()
            if start_error is not None:
                socket.send_pyobj(Reply(error=start_error))
                return
            try:
                if call.method.startswith("_") or not hasattr(EngineService, call.method):
                    raise AttributeError(f"an instance has no operation {call.method!r}")
                reply = Reply(value=getattr(service, call.method)(*call.args))
            except RankFailure:
                # Not an error of this call: the instance can no longer run. Dying (its ranks follow)
                # is what makes the node restart it and resume its requests.
                traceback.print_exc(file=sys.stderr)
                sys.stderr.flush()
                os._exit(RANK_LOST_EXIT_CODE)
            except Exception as error:  # noqa: BLE001 - the caller re-raises it
                reply = Reply(error=portable(error))
            socket.send_pyobj(reply)
            if service.stopping:
                return
    finally:
        socket.close(linger=0)
        context.term()


if __name__ == "__main__":
    # Run the importable copy of this module, so the records it sends pickle under their real names.
    from aegaeon.instance.worker import serve as serve_node_calls

    serve_node_calls(pickle.load(sys.stdin.buffer))
