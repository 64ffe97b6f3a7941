"""A backend that serves the models of one `LLMEngine` in the api server's own process.

No node, no metadata store, no ZeroMQ: a thread owns the engine and steps it, taking turns among the
models that have requests (a few steps each, switching the engine between them), and hands each
output to its request's stream on the event loop. What the api server does with requests (checks,
tokenization, streams, errors) is exactly what it does over a cluster, so this is what a test of the
HTTP layer runs on, and a way to serve a few small models from one process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from aegaeon.config import DEFAULT_KEY_WEIGHT
from aegaeon.errors import InvalidRequest, Unavailable
from aegaeon.serve.backend import Health, Location, ModelInfo, RequestStream, model_not_found
from aegaeon.serve.metadata import ModelRecord
from aegaeon.serve.model_states import DEVICE, host_state

if TYPE_CHECKING:
    from aegaeon.engine.engine import LLMEngine
    from aegaeon.engine.outputs import RequestOutput
    from aegaeon.engine.sampling_params import SamplingParams
    from aegaeon.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# This process stands for the node in a model's locations.
LOCAL_NODE = "local"
# How often a model being removed is checked for requests still running.
REMOVE_POLL_S = 0.05

# Steps one model runs before another model with requests gets the engine: each switch preempts the
# running sequences (they are recomputed), so a few steps per turn keep that cost small.
STEPS_PER_TURN = 8

T = TypeVar("T")


class EngineBackend:
    """The models of `engine`, served from this process; the engine is owned by a thread of its own."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.error: BaseException | None = None  # what stopped the engine thread, if anything did
        self._created = int(time.time())
        # Every call into the engine runs on its thread, between steps: the engine is not thread-safe.
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._turn = 0  # index of the model whose turn came last
        self._records: dict[str, ModelRecord] = {}  # the models added while serving
        self._removing: set[str] = set()  # refused from now on, removed once their requests ended
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-backend", daemon=True)
        self._thread.start()

    # -- the api server's side ---------------------------------------------------------------------------

    async def models(self) -> list[ModelInfo]:
        return await asyncio.wrap_future(self._call(lambda: [self._info(name) for name in self._served()]))

    async def model(self, name: str) -> ModelInfo:
        """The model as a request needs it (its state is read by `models`, between engine steps)."""
        if name not in self._served():
            raise model_not_found(name, self._served())
        return ModelInfo(name, self.engine.models[name].max_model_len, self._created)

    async def add_model(self, record: ModelRecord) -> ModelInfo:
        """Register the model on the engine (its thread); the SLO and priority are kept, not used here."""

        def register() -> None:
            if record.name in self.engine.models:
                raise InvalidRequest(f"a model called {record.name!r} is registered already", param="name")
            self.engine.register(record.name, record.path, record.pinned)
            self._records[record.name] = record

        await asyncio.wrap_future(self._call(register))
        return await asyncio.wrap_future(self._call(lambda: self._info(record.name)))

    async def remove_model(self, name: str) -> None:
        """Refuse new requests for `name`, wait for its requests in flight, then unregister it."""
        if name not in self.engine.models:
            raise model_not_found(name, self._served())
        self._removing.add(name)
        while await asyncio.wrap_future(self._call(lambda: self.engine.has_unfinished_requests(name))):
            await asyncio.sleep(REMOVE_POLL_S)

        def unregister() -> None:
            self.engine.unregister(name)
            self._records.pop(name, None)
            self._removing.discard(name)

        await asyncio.wrap_future(self._call(unregister))

    async def tokenizer(self, name: str) -> Tokenizer:
        await self.model(name)
        return self.engine.models[name].tokenizer

    async def health(self) -> Health:
        if self.error is not None:
            return Health(False, f"the engine failed: {self.error}", 0)
        return Health(True, None, len(self._streams))

    async def generate(
        self,
        model: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        key: str | None = None,
        key_weight: float = DEFAULT_KEY_WEIGHT,
    ) -> RequestStream:
        """Queue the request on the engine; its checks (prompt, model) raise here, before any output.

        One engine batches every request it holds: the API key (`key`, `key_weight`) changes nothing.
        """
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def add() -> None:
            if self.error is not None:
                raise Unavailable(f"the engine failed: {self.error}")
            if model in self._removing:
                raise model_not_found(model, self._served())
            self.engine.add_request(request_id, prompt_token_ids, params, model)
            self._streams[request_id] = (loop, outputs)

        await asyncio.wrap_future(self._call(add))
        return RequestStream(request_id, outputs, self._abort)

    def close(self) -> None:
        """Stop the engine thread (requests still running get no more outputs)."""
        self._stopping = True
        self._inbox.put(lambda: None)
        self._thread.join()

    # -- the engine thread -------------------------------------------------------------------------------

    def _served(self) -> list[str]:
        return [name for name in self.engine.models if name not in self._removing]

    def _info(self, name: str) -> ModelInfo:
        """The model's info, with its state (on the engine thread: the engine is not thread-safe)."""
        served = self.engine.models[name]
        if self.engine.is_resident(name):
            state = DEVICE
        else:
            state = host_state(self.engine.residency.model_cache, served.cache_key)
        record = self._records.get(name)
        created = int(record.registered_at) if record is not None else self._created
        instance = "engine" if state == DEVICE else None
        location = Location(LOCAL_NODE, instance, state)
        return ModelInfo(name, served.max_model_len, created, state, (location,), record)

    def _call(self, function: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `function` on the engine thread; its result (or exception) in the future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                future.set_exception(error)

        self._inbox.put(run)
        return future

    def _abort(self, request_id: str) -> None:
        """A stream closed before its request finished: stop the request (never blocks the caller)."""

        def abort() -> None:
            if self._streams.pop(request_id, None) is not None:
                self.engine.abort_request(request_id)

        self._call(abort)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as error:  # noqa: BLE001 - every request is told, then serving stops
            logger.exception("the engine failed")
            self._fail_all(error)
        while not self._stopping:  # answer what still comes in (a new request: Unavailable)
            self._take_calls(wait=True)

    def _serve(self) -> None:
        steps_left = 0
        while not self._stopping and self.error is None:
            self._take_calls(wait=not self.engine.has_unfinished_requests())
            if self._stopping or not self.engine.has_unfinished_requests():
                continue
            active = self.engine.active
            if steps_left == 0 or active is None or not self.engine.has_unfinished_requests(active.name):
                self.engine.switch_to(self._next_model())
                steps_left = STEPS_PER_TURN
            steps_left -= 1
            for output in self.engine.step():
                self._deliver(output)

    def _take_calls(self, wait: bool) -> None:
        try:
            call = self._inbox.get() if wait else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            call()
            try:
                call = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _next_model(self) -> str:
        """The next model, in turn, that has requests (one has: the engine has unfinished requests)."""
        names = list(self.engine.models)  # a model being removed still runs its requests
        for offset in range(1, len(names) + 1):
            index = (self._turn + offset) % len(names)
            if self.engine.has_unfinished_requests(names[index]):
                self._turn = index
                return names[index]
        return names[self._turn]

    def _deliver(self, output: RequestOutput) -> None:
        target = self._streams.get(output.request_id)
        if target is None:
            return  # aborted meanwhile
        if output.finished:
            del self._streams[output.request_id]
        loop, outputs = target
        loop.call_soon_threadsafe(outputs.put_nowait, output)

    def _fail_all(self, error: BaseException) -> None:
        self.error = error
        for loop, outputs in self._streams.values():
            loop.call_soon_threadsafe(outputs.put_nowait, error)
        self._streams.clear()
