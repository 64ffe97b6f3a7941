"""The api server's view of the cluster: which models the live nodes serve, and generation as streams.

`ClusterBackend` reads the metadata store for the live nodes and their models (cached for
`CATALOG_TTL_S`), routes each request to a node by load (`MetadataStore.pick_node`), writes the
request's record, and talks to the node over ZeroMQ (a DEALER per node, messages in wire.py, CURVE
with the cluster's keys when it has them: keys.py). A
request's outputs arrive on the event loop and wait on an asyncio queue of its own; closing a stream
before its request finished (a client went away, a handler was cancelled) aborts it on its node. A
node that stops beating (for `LivenessConfig.node_timeout_s`) hands its requests on: each is submitted
again to another live node serving its model with the tokens its client already has, and continues
there as after an instance restart (greedy streams exactly), so the client sees one stream. A request no
node can take fails, so no stream waits forever. A registered model with no live node answers 503.

Tokenizers are loaded from the model directories the nodes registered: an api server on another
machine needs read access to them (the tokenizer files only). Store reads and tokenizer loading run
in worker threads: the event loop only ever waits on them.

`Backend` is what the api server's routes need; `ClusterBackend` is the one `aegaeon serve` runs,
`aegaeon.serve.engine_backend.EngineBackend` serves from an engine in the api server's own process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import zmq
import zmq.asyncio

from aegaeon.config import DEFAULT_KEY_WEIGHT, LivenessConfig
from aegaeon.errors import Draining, InvalidRequest, ModelNotFound, Unavailable
from aegaeon.serve.keys import ClusterKeys
from aegaeon.serve.metadata import (
    FROM_ADMIN,
    MODEL_DRAINING,
    MetadataStore,
    ModelRecord,
    RequestRecord,
)
from aegaeon.serve.model_states import DEVICE, HOST, best_state
from aegaeon.serve.wire import (
    Abort,
    Accepted,
    AddModel,
    Done,
    Failed,
    NodeMessage,
    Output,
    Rejected,
    RemoveModel,
    Submit,
    WireDecodeError,
    decode_node_message,
    encode,
    raised_error,
    request_output,
)

if TYPE_CHECKING:
    from aegaeon.engine.outputs import RequestDelta
    from aegaeon.engine.sampling_params import SamplingParams
    from aegaeon.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# The model list is read from the store at most this often.
CATALOG_TTL_S = 1.0
# A node that has not accepted or rejected a request by then is taken as unreachable.
ACCEPT_TIMEOUT_S = 30.0
# A request refused by this many shutting-down nodes in a row is answered 503 instead of tried again.
MAX_DRAINING_RETRIES = 3
# How long the nodes get to load a model added through the admin API (weights read from disk).
ADD_MODEL_TIMEOUT_S = 600.0
# How long a model being removed waits for its requests in flight before the removal answers 503.
REMOVE_DRAIN_TIMEOUT_S = 60.0
# A node answers a removal after the drain: the api server waits that long and a little more.
COMMAND_MARGIN_S = 30.0


@dataclass(frozen=True)
class Location:
    """Where a model is: on a node (host cache, loading, disk) or on one of its instances (device)."""

    node: str
    instance: str | None
    state: str


@dataclass(frozen=True)
class ModelInfo:
    """A registered model as the API lists it."""

    name: str
    max_model_len: int  # 0 while no node serves it
    created: int  # Unix seconds: when it was registered (or its first node)
    state: str = HOST  # the best of its states on the nodes (model_states.STATES)
    locations: tuple[Location, ...] = ()
    record: ModelRecord | None = None  # its registry record: path and settings


@dataclass(frozen=True)
class Health:
    """Whether requests can be served; `error` says why not."""

    ok: bool
    error: str | None
    live_requests: int


class Backend(Protocol):
    """What the api server's routes need of whatever serves the models."""

    async def models(self) -> list[ModelInfo]:
        """The registered models, with their states."""
        ...

    async def model(self, name: str) -> ModelInfo:
        """The served model called `name`; ModelNotFound if there is none."""
        ...

    async def add_model(self, record: ModelRecord) -> ModelInfo:
        """Register a model and serve it (InvalidRequest if the name is taken); once served, its info."""
        ...

    async def remove_model(self, name: str) -> None:
        """Refuse new requests for `name`, let those in flight finish, then drop it (ModelNotFound)."""
        ...

    async def tokenizer(self, name: str) -> Tokenizer:
        """The model's tokenizer; ModelNotFound if no model is called `name`."""
        ...

    async def health(self) -> Health: ...

    async def generate(
        self,
        model: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        key: str | None = None,
        key_weight: float = DEFAULT_KEY_WEIGHT,
    ) -> RequestStream:
        """Submit a request; its output stream once it is accepted. A refusal raises an AegaeonError.

        `key`: the id of the API key it came with (None: none), `key_weight` that key's share of the
        model's waiting queue.
        """
        ...

    def close(self) -> None:
        """Release what serving held (call after the HTTP server stopped)."""
        ...


def model_not_found(name: str, served: Iterable[str]) -> ModelNotFound:
    return ModelNotFound(f"The model {name!r} does not exist; served models: {', '.join(served)}")


class RequestStream:
    """A request's outputs (what is new since the one before), in order, as an async iterator.

    When several outputs are waiting, `__anext__` returns them merged into one. Errors are raised
    from it.
    """

    def __init__(
        self,
        request_id: str,
        queue: asyncio.Queue[RequestDelta | BaseException],
        abort: Callable[[str], None],
    ):
        self.request_id = request_id
        self._queue = queue
        self._abort = abort
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not isinstance(item, BaseException) and not item.finished and not self._queue.empty():
            later = self._queue.get_nowait()
            item = later if isinstance(later, BaseException) else item.merge(later)
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def close(self) -> None:
        """Abort the request on its node unless it already finished (idempotent)."""
        if not self.finished:
            self.finished = True
            self._abort(self.request_id)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _InFlight:
    node_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    accepted: asyncio.Future
    started: float = field(default_factory=time.monotonic)
    output_tokens: int = 0
    # What its client has received, by choice index: where it resumes if its node goes silent.
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    moving: bool = False  # being handed to another node
    key: str | None = None  # the id of its API key, and that key's weight in fair sharing
    key_weight: float = DEFAULT_KEY_WEIGHT


class _NodeLink:
    """One api server's connection to one node, and the task that reads the node's answers."""

    def __init__(
        self,
        node_id: str,
        address: str,
        context: zmq.asyncio.Context,
        on_message: Callable[[str, NodeMessage], None],
        keys: ClusterKeys | None = None,
    ):
        self.node_id = node_id
        self.address = address
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)  # the node's outputs are never dropped on the way in
        if keys is not None:
            self.socket.curve_secretkey = keys.for_api()
            self.socket.curve_publickey = keys.api_public
            self.socket.curve_serverkey = keys.node_public
        self.socket.connect(address)
        self._on_message = on_message  # told (node id, message)
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            payload = await self.socket.recv()
            try:
                message = decode_node_message(payload)
            except WireDecodeError as error:  # one unreadable message must not stop the link
                logger.warning("dropped an unreadable message from node %s: %s", self.node_id, error)
                continue
            self._on_message(self.node_id, message)

    async def send(self, message: Submit | Abort | AddModel | RemoveModel) -> None:
        await self.socket.send(encode(message))

    def close(self) -> None:
        self.reader.cancel()
        self.socket.close(linger=0)


class ClusterBackend:
    """What the api server needs from the cluster, read from the metadata store and the nodes."""

    def __init__(
        self,
        store: MetadataStore,
        api_server_id: str | None = None,
        keys: ClusterKeys | None = None,
        liveness: LivenessConfig | None = None,
    ):
        self.store = store
        self.keys = keys
        self.liveness = liveness or LivenessConfig()
        self.api_server_id = api_server_id or f"api-{uuid.uuid4().hex[:8]}"
        self._catalog: dict[str, tuple[ModelInfo, str]] = {}  # served: name -> (info, model directory)
        self._listed: list[ModelInfo] = []  # every registered model, served or not
        self._registered: set[str] = set()  # the registry's names, less those draining
        self._catalog_at = float("-inf")
        self._commands: dict[str, asyncio.Future] = {}  # admin commands sent to nodes, by id
        self._tokenizers: dict[str, Tokenizer] = {}  # by model directory
        self._context: zmq.asyncio.Context | None = None
        self._links: dict[str, _NodeLink] = {}
        self._in_flight: dict[str, _InFlight] = {}
        self._watcher: asyncio.Task | None = None
        self._background: set[asyncio.Future] = set()

    # -- models ----------------------------------------------------------------------------------------

    def _live_node_ids(self) -> set[str]:
        window = self.liveness.node_timeout_s
        return {status.info.node_id for status in self.store.instances(alive_within_s=window)}

    def _refresh(self) -> None:
        if time.monotonic() - self._catalog_at < CATALOG_TTL_S:
            return
        statuses = self.store.instances(alive_within_s=self.liveness.node_timeout_s)
        live = {status.info.node_id for status in statuses}
        records = {record.name: record for record in self.store.registered_models()}
        draining = {name for name, record in records.items() if record.state == MODEL_DRAINING}
        catalog: dict[str, tuple[ModelInfo, str]] = {}
        locations: dict[str, list[Location]] = {}
        for node in sorted(self.store.nodes(), key=lambda n: n.registered_at):
            if node.node_id not in live:
                continue
            for name, state in node.model_states.items():
                locations.setdefault(name, []).append(Location(node.node_id, None, state))
            for name in node.models:
                if name in draining:  # new requests for it are refused at once
                    continue
                length = node.max_model_lens.get(name, 0)
                if name in catalog:  # nodes may be configured differently: promise what every one allows
                    info, model_dir = catalog[name]
                    length = min(length, info.max_model_len)
                    catalog[name] = (replace(info, max_model_len=length), model_dir)
                else:
                    created = int(node.registered_at)
                    catalog[name] = (ModelInfo(name, length, created), node.model_dirs.get(name, ""))
        for status in statuses:
            for name in status.info.models_resident:
                locations.setdefault(name, []).append(
                    Location(status.info.node_id, status.info.instance_id, DEVICE)
                )
        listed = {name: info for name, (info, _) in catalog.items()}
        for name, record in records.items():  # added through the admin API: listed even where none serves it
            if record.source == FROM_ADMIN and name not in listed and name not in draining:
                listed[name] = ModelInfo(name, 0, int(record.registered_at))
        self._listed = [
            replace(
                info,
                created=int(records[name].registered_at) if name in records else info.created,
                state=best_state(location.state for location in locations.get(name, ())),
                locations=tuple(locations.get(name, ())),
                record=records.get(name),
            )
            for name, info in listed.items()
        ]
        self._catalog = {name: (info, model_dir) for name, (info, model_dir) in catalog.items()}
        self._registered = set(records) - draining
        self._catalog_at = time.monotonic()

    async def _fresh(self) -> dict[str, tuple[ModelInfo, str]]:
        """The catalog, read again from the store (in a thread) once it is older than its TTL."""
        if time.monotonic() - self._catalog_at >= CATALOG_TTL_S:
            await asyncio.to_thread(self._refresh)
        return self._catalog

    async def models(self) -> list[ModelInfo]:
        await self._fresh()
        return list(self._listed)

    async def model(self, name: str) -> ModelInfo:
        catalog = await self._fresh()
        if (
            name not in catalog
        ):  # perhaps added since the catalog was read: every api server serves it at once
            self._catalog_at = float("-inf")
            catalog = await self._fresh()
        if name not in catalog:
            if name in self._registered:  # known, but its nodes are down or still loading it
                raise Unavailable(
                    f"model {name!r} is registered but no live node serves it now; retry shortly",
                    retry_after_s=self.liveness.no_node_retry_after_s,
                )
            raise model_not_found(name, catalog)
        return catalog[name][0]

    # -- the live registry -------------------------------------------------------------------------------

    async def add_model(self, record: ModelRecord) -> ModelInfo:
        """Write the record, have every live node serve the model, and return it once they do.

        A model no node could load is dropped from the registry again, with the nodes' error; one that
        some node loaded stays (the failures are logged). With no live node it stays registered, on
        disk, and the nodes serve it as they start.
        """
        self._catalog_at = float("-inf")
        await self._fresh()
        if record.name in self._catalog or await asyncio.to_thread(self.store.registered_model, record.name):
            raise InvalidRequest(f"a model called {record.name!r} is registered already", param="name")
        await asyncio.to_thread(self.store.put_model, record)
        message = lambda: AddModel(  # noqa: E731 - one command id per node
            uuid.uuid4().hex,
            record.name,
            record.path,
            record.ttft_s,
            record.tbt_s,
            record.pinned,
            record.priority,
        )
        nodes = await asyncio.to_thread(self._live_node_ids)
        errors = await self._on_nodes(sorted(nodes), message, ADD_MODEL_TIMEOUT_S)
        for node_id, error in errors.items():
            logger.warning("node %s could not serve model %s: %s", node_id, record.name, error)
        if nodes and len(errors) == len(nodes):
            await asyncio.to_thread(self.store.remove_model, record.name)
            raise next(iter(errors.values()))
        self._catalog_at = float("-inf")
        return next(info for info in await self.models() if info.name == record.name)

    async def remove_model(self, name: str) -> None:
        """Mark the model draining (every api server refuses it from then on), then remove it everywhere."""
        self._catalog_at = float("-inf")
        await self._fresh()
        record = await asyncio.to_thread(self.store.registered_model, name)
        if record is None and name not in self._catalog:
            raise model_not_found(name, self._catalog)
        if record is not None:
            await asyncio.to_thread(self.store.put_model, replace(record, state=MODEL_DRAINING))
        nodes = await asyncio.to_thread(self._live_node_ids)
        errors = await self._on_nodes(
            sorted(nodes),
            lambda: RemoveModel(uuid.uuid4().hex, name, REMOVE_DRAIN_TIMEOUT_S),
            REMOVE_DRAIN_TIMEOUT_S + COMMAND_MARGIN_S,
        )
        failed = [error for error in errors.values() if not isinstance(error, ModelNotFound)]
        self._catalog_at = float("-inf")
        if failed:  # still draining somewhere: the record stays, marked, and a second removal goes on
            raise failed[0]
        await asyncio.to_thread(self.store.remove_model, name)

    async def _on_nodes(
        self, node_ids: list[str], message: Callable[[], AddModel | RemoveModel], timeout_s: float
    ) -> dict[str, BaseException]:
        """Send a command to each node and wait for every answer; the errors, by node."""
        results = await asyncio.gather(
            *(self._command(node_id, message(), timeout_s) for node_id in node_ids), return_exceptions=True
        )
        return {
            node_id: result
            for node_id, result in zip(node_ids, results, strict=True)
            if isinstance(result, BaseException)
        }

    async def _command(self, node_id: str, message: AddModel | RemoveModel, timeout_s: float) -> None:
        link = await self._link(node_id)
        answer = asyncio.get_running_loop().create_future()
        self._commands[message.command_id] = answer
        try:
            await link.send(message)
            done: Done = await asyncio.wait_for(answer, timeout_s)
        except TimeoutError:
            raise Unavailable(f"node {node_id} did not answer within {timeout_s:.0f} s") from None
        finally:
            self._commands.pop(message.command_id, None)
        if done.error is not None:
            raise raised_error(done.error)

    async def tokenizer(self, name: str) -> Tokenizer:
        """The model's tokenizer, loaded once per model directory (in a thread)."""
        from aegaeon.engine.tokenizer import Tokenizer

        catalog = await self._fresh()
        if name not in catalog:  # its last node left since the model was looked up
            raise model_not_found(name, catalog)
        _, model_dir = catalog[name]
        if model_dir not in self._tokenizers:
            self._tokenizers[model_dir] = await asyncio.to_thread(Tokenizer.from_pretrained, model_dir)
        return self._tokenizers[model_dir]

    async def health(self) -> Health:
        await self._fresh()
        if not self._catalog:
            window = self.liveness.node_timeout_s
            return Health(False, f"no node is serving (none sent a heartbeat in {window:.0f} s)", 0)
        return Health(True, None, len(self._in_flight))

    # -- generation --------------------------------------------------------------------------------------

    async def generate(
        self,
        model: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        key: str | None = None,
        key_weight: float = DEFAULT_KEY_WEIGHT,
    ) -> RequestStream:
        """Route a request to a node, submit it, and return its output stream once the node accepted it.

        Bad input raises here (an AegaeonError: InvalidRequest, ModelNotFound, Overloaded, or
        Unavailable when no node can take it), before any output exists, so a caller can still
        answer with a clean error.
        """
        refused_by: set[str] = set()
        while True:
            try:
                return await self._generate_on_some_node(
                    model, prompt_token_ids, params, request_id, refused_by, key, key_weight
                )
            except Draining:  # that node (now in refused_by) is shutting down: another one may take it
                if len(refused_by) > MAX_DRAINING_RETRIES:
                    raise

    async def _generate_on_some_node(
        self,
        model: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        avoid: set[str],
        key: str | None = None,
        key_weight: float = DEFAULT_KEY_WEIGHT,
    ) -> RequestStream:
        loop = asyncio.get_running_loop()
        node_id = await self._pick_node(model, avoid)
        link = await self._link(node_id)
        record = RequestRecord(
            request_id,
            model,
            api_server=self.api_server_id,
            node_id=node_id,
            prompt_tokens=len(prompt_token_ids),
        )
        await asyncio.to_thread(self.store.put_request, record)
        flight = _InFlight(
            node_id,
            model,
            list(prompt_token_ids),
            params,
            asyncio.Queue(),
            loop.create_future(),
            key=key,
            key_weight=key_weight,
        )
        self._in_flight[request_id] = flight
        self._watch()
        try:
            await link.send(
                Submit(request_id, model, list(prompt_token_ids), params, key=key, key_weight=key_weight)
            )
            answer = await asyncio.wait_for(flight.accepted, ACCEPT_TIMEOUT_S)
        except TimeoutError:
            self._in_flight.pop(request_id, None)
            raise Unavailable(f"node {node_id} did not answer within {ACCEPT_TIMEOUT_S:.0f} s") from None
        except BaseException:
            self._in_flight.pop(request_id, None)
            raise
        if isinstance(answer, Rejected):
            self._in_flight.pop(request_id, None)
            error = raised_error(answer.error)
            if isinstance(error, Draining):
                avoid.add(node_id)
            raise error
        return RequestStream(request_id, flight.queue, self._abort)

    async def _pick_node(self, model: str, avoid: set[str]) -> str:
        """The live node to send a request of `model` to, by load (those in `avoid` never); else 503."""
        in_flight: dict[str, float] = dict.fromkeys(avoid, math.inf)
        for flight in self._in_flight.values():
            in_flight[flight.node_id] = in_flight.get(flight.node_id, 0.0) + 1.0
        window = self.liveness.node_timeout_s
        node_id = await asyncio.to_thread(self.store.pick_node, model, window, in_flight)
        if node_id is None or node_id in avoid:
            raise Unavailable(
                f"no live node serves model {model!r} right now; retry shortly",
                retry_after_s=self.liveness.no_node_retry_after_s,
            )
        return node_id

    async def _link(self, node_id: str) -> _NodeLink:
        link = self._links.get(node_id)
        if link is None:
            node = await asyncio.to_thread(self.store.get_node, node_id)
            if node is None:
                raise Unavailable(f"node {node_id} left the cluster; retry")
            # Another request of a burst may have linked the node while this one read the store: one
            # link per node (a second socket would be left open, and would hold up closing).
            link = self._links.get(node_id)
            if link is None:
                if self._context is None:
                    self._context = zmq.asyncio.Context()
                link = _NodeLink(node_id, node.address, self._context, self._deliver, self.keys)
                self._links[node_id] = link
        return link

    def _deliver(self, node_id: str, message: NodeMessage) -> None:
        """A node's answer, on the event loop: settle the submit or command, or feed the request's stream."""
        if isinstance(message, Done):
            answer = self._commands.get(message.command_id)
            if answer is not None and not answer.done():
                answer.set_result(message)
            return
        flight = self._in_flight.get(message.request_id)
        if flight is None or flight.node_id != node_id:
            return  # aborted meanwhile, or moved on from a node that went silent and spoke again
        if isinstance(message, Accepted | Rejected):
            if not flight.accepted.done():
                flight.accepted.set_result(message)
        elif isinstance(message, Output):
            output = request_output(message)
            flight.queue.put_nowait(output)
            flight.output_tokens += sum(len(choice.token_ids) for choice in output.outputs)
            for choice in output.outputs:
                flight.token_ids.setdefault(choice.index, []).extend(choice.token_ids)
                if choice.finish_reason is not None:
                    flight.finish_reasons[choice.index] = choice.finish_reason
            if output.finished:
                del self._in_flight[message.request_id]
                self._log_end(message.request_id, flight, "finished", output_tokens=flight.output_tokens)
        elif isinstance(message, Failed):
            error = raised_error(message.error)
            flight.queue.put_nowait(error)
            del self._in_flight[message.request_id]
            self._log_end(message.request_id, flight, "failed", error=str(error))

    def _abort(self, request_id: str) -> None:
        flight = self._in_flight.pop(request_id, None)
        link = self._links.get(flight.node_id) if flight is not None else None
        if link is not None:
            self._spawn(link.send(Abort(request_id)))
            self._log_end(request_id, flight, "aborted")

    @staticmethod
    def _log_end(request_id: str, flight: _InFlight, outcome: str, **fields) -> None:
        """One line per request that ended, with its id (never its prompt or output text)."""
        seconds = round(time.monotonic() - flight.started, 3)
        logger.info(
            "request %s %s on %s after %.3f s",
            request_id,
            outcome,
            flight.node_id,
            seconds,
            extra={
                "request_id": request_id,
                "model": flight.model,
                "node_id": flight.node_id,
                **({"api_key_id": flight.key} if flight.key else {}),
                "outcome": outcome,
                "seconds": seconds,
                **fields,
            },
        )

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- node failures -----------------------------------------------------------------------------------

    def _watch(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch_nodes())

    async def _watch_nodes(self) -> None:
        """Move the requests of nodes that stopped beating to live ones; ends when nothing is in flight."""
        while self._in_flight:
            # As often as nodes beat: a silent node is noticed within a beat of its timeout.
            await asyncio.sleep(self.liveness.heartbeat_interval_s)
            try:
                live = await asyncio.to_thread(self._live_node_ids)
            except Exception as error:  # noqa: BLE001 - the store may be restarting: look again later
                logger.warning("could not read node liveness: %s", error)
                continue
            for request_id, flight in list(self._in_flight.items()):
                if flight.node_id in live or flight.moving:
                    continue
                if flight.accepted.done():
                    flight.moving = True
                    self._spawn(self._move(request_id, flight))
                else:  # generate() still waits for the silent node's answer: it answers 503
                    del self._in_flight[request_id]
                    flight.accepted.set_exception(
                        Unavailable(
                            f"node {flight.node_id} stopped answering (no heartbeat); retry shortly",
                            retry_after_s=self.liveness.no_node_retry_after_s,
                        )
                    )

    async def _move(self, request_id: str, flight: _InFlight) -> None:
        """Submit a request whose node went silent to another live node, resumed from its tokens so far."""
        silent = flight.node_id
        loop = asyncio.get_running_loop()
        try:
            node_id = await self._pick_node(flight.model, {silent})
            link = await self._link(node_id)
            if self._in_flight.get(request_id) is not flight:
                return  # its client went away meanwhile
            flight.node_id, flight.accepted = node_id, loop.create_future()
            await link.send(
                Submit(
                    request_id,
                    flight.model,
                    flight.prompt_token_ids,
                    flight.params,
                    {index: list(ids) for index, ids in flight.token_ids.items()},
                    dict(flight.finish_reasons),
                    key=flight.key,
                    key_weight=flight.key_weight,
                )
            )
            answer = await asyncio.wait_for(flight.accepted, ACCEPT_TIMEOUT_S)
            if isinstance(answer, Rejected):
                raise raised_error(answer.error)
        except Exception as error:  # noqa: BLE001 - whatever stopped the move ends the request with it
            if self._in_flight.get(request_id) is flight:
                del self._in_flight[request_id]
                message = f"node {silent} stopped answering (no heartbeat); no other node took over: {error}"
                flight.queue.put_nowait(
                    Unavailable(message, retry_after_s=self.liveness.no_node_retry_after_s)
                )
                self._log_end(request_id, flight, "failed", error=message)
            return
        finally:
            flight.moving = False
        generated = max(map(len, flight.token_ids.values()), default=0)
        logger.warning(
            "request %s moved from silent node %s to %s after %d tokens",
            request_id,
            silent,
            node_id,
            generated,
        )
        await asyncio.to_thread(self._store_call, self.store.update_request, request_id, node_id=node_id)

    def _store_call(self, method, *args, **kwargs) -> None:
        try:
            method(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - a record is bookkeeping: the request goes on without it
            logger.warning("could not update a request record: %s", error)

    def close(self) -> None:
        """Drop the node connections (call after the HTTP server stopped: its streams are closed by then).

        Bounded whatever state the nodes are in: every socket of the context is closed without linger
        (what is unsent is dropped: its requests are over), so terminating the context cannot wait.
        """
        for link in self._links.values():
            link.close()
        self._links.clear()
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None
