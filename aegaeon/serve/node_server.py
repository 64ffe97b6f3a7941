"""A node on the network: takes requests from api servers over ZeroMQ and keeps the metadata store told.

The server binds a ROUTER socket; every api server holds a DEALER connected to it (aegaeon/serve/wire.py
has the messages). One thread owns the socket: it submits incoming requests to the node, answers each
with `Accepted`/`Rejected`, and sends the outputs the node's instance threads hand it through an outbox
(a pipe wakes it, so a token leaves as soon as it is made). The same thread writes each request's record
(state, instance, first-token time, tokens so far) to the store, after the outputs are sent.

Messages are typed records (wire.py): a payload that is not one of them is logged and dropped. With
cluster keys (keys.py) the port is encrypted and admits only api servers holding the cluster's api key
(ZeroMQ CURVE); without them a node listens on loopback only, unless told `insecure`.

A second thread registers the node, its models and its instances, and beats every `heartbeat_interval_s`
with each instance's load; api servers route by that load (`MetadataStore.pick_node`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator

from aegaeon.config import DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_PRIORITY, SLO
from aegaeon.engine.outputs import RequestDelta
from aegaeon.instance.admission import Draining
from aegaeon.instance.node import Node
from aegaeon.serve.keys import ClusterKeys
from aegaeon.serve.metadata import (
    FROM_ADMIN,
    FROM_CONFIG,
    LOAD_KV_USAGE,
    LOAD_RUNNING,
    LOAD_WAITING,
    MODEL_ACTIVE,
    InstanceInfo,
    MetadataStore,
    MetadataStoreError,
    ModelRecord,
    NodeInfo,
    RequestState,
)
from aegaeon.serve.model_states import LOADING, host_state
from aegaeon.serve.wire import (
    Abort,
    Accepted,
    AddModel,
    Done,
    Failed,
    Rejected,
    RemoveModel,
    Submit,
    WireDecodeError,
    decode_api_message,
    encode,
    output_message,
    wire_error,
)

logger = logging.getLogger(__name__)

# How often the socket thread looks up from an idle socket to see whether it should stop.
IDLE_POLL_MS = 500
ANY_ADDRESS = ("0.0.0.0", "", "*")
DRAIN_POLL_S = 0.05
# Closing waits this long for each thread: the socket thread looks up every IDLE_POLL_MS, and a
# heartbeat stuck on an unreachable store gives up after the store's own retries (about 5 s).
JOIN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class _Moved:
    request_id: str
    state: str
    instance: str


@dataclass(frozen=True)
class _Failure:
    request_id: str
    error: BaseException


@dataclass(frozen=True)
class _Reply:
    identity: bytes
    message: Done


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def advertised_host(host: str) -> str:
    """The address other machines reach a server listening on `host` at."""
    return socket.gethostbyname(socket.gethostname()) if host in ANY_ADDRESS else host


def check_listen_address(host: str, keys: ClusterKeys | None, insecure: bool) -> None:
    """Refuse (ValueError) a node port reachable from other machines that anyone could submit to."""
    if keys is None and not insecure and not is_loopback(host):
        raise ValueError(
            f"refusing to take requests on {host} without cluster keys: anyone reaching the port could "
            "submit work; give --cluster-keys DIR (make one with `aegaeon keys DIR`), or --insecure on a "
            "network you trust"
        )


class NodeServer:
    """Serves one `Node` to api servers; the node stays the caller's to close (after this server)."""

    def __init__(
        self,
        node: Node,
        store: MetadataStore,
        host: str = "127.0.0.1",
        port: int = 0,
        node_id: str | None = None,
        keys: ClusterKeys | None = None,
        insecure: bool = False,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
    ):
        check_listen_address(host, keys, insecure)
        self.node = node
        self.heartbeat_interval_s = heartbeat_interval_s
        self.store = store
        self.node_id = node_id or f"node-{uuid.uuid4().hex[:8]}"
        # A context of its own: closing it cannot wait on sockets someone else opened.
        self._context = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            # CURVE: encrypted, and ZAP admits only clients whose public key is a *.key file of the directory.
            self._auth = ThreadAuthenticator(self._context)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(keys.directory))
            self._socket.curve_secretkey = keys.for_node()
            self._socket.curve_publickey = keys.node_public
            self._socket.curve_server = True
        # No high-water mark: past one, ZeroMQ would drop outputs (a final one would leave a stream
        # waiting, a lost delta would cut text out of it).
        self._socket.setsockopt(zmq.SNDHWM, 0)
        bind_host = "*" if host in ANY_ADDRESS else host
        if port == 0:
            port = self._socket.bind_to_random_port(f"tcp://{bind_host}")
        else:
            self._socket.bind(f"tcp://{bind_host}:{port}")
        self.address = f"tcp://{advertised_host(host)}:{port}"
        self._outbox: queue.SimpleQueue[RequestDelta | _Moved | _Failure | _Reply] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._senders: dict[str, bytes] = {}  # request id -> identity of the api server that sent it
        self._recorded: dict[str, int] = {}  # request id -> output tokens already in its record
        self._finish_reasons: dict[str, str] = {}  # request id -> why its first choice ended
        self._stopping = threading.Event()
        self._draining = threading.Event()
        # The live registry: models being added here, and the per-model states last published.
        self._registry_lock = threading.Lock()
        self._loading: set[str] = set()
        self._published_states: dict[str, str] = {}
        node.on_state = lambda request_id, state, instance: self._post(_Moved(request_id, state, instance))
        self._register()
        self._threads = [
            threading.Thread(target=self._serve, name="aegaeon-node-server", daemon=True),
            threading.Thread(target=self._heartbeats, name="aegaeon-node-heartbeat", daemon=True),
            threading.Thread(target=self._follow_registry, name="aegaeon-node-registry", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def instance_id(self, instance_name: str) -> str:
        return f"{self.node_id}/{instance_name}"

    # -- registration and heartbeats -------------------------------------------------------------------

    def _register(self) -> None:
        snapshot = self.node.snapshot()
        self._publish()
        scheduler = self.node.config.scheduler
        slos = dict(scheduler.model_slos)
        for model in snapshot.models:  # the configured models are the initial registry
            slo = slos.get(model.name)
            self.store.add_model_if_absent(
                ModelRecord(
                    model.name,
                    model.model_dir,
                    ttft_s=slo.ttft_s if slo else None,
                    tbt_s=slo.tbt_s if slo else None,
                    priority=scheduler.priority(model.name),
                    source=FROM_CONFIG,
                )
            )
            self.store.place_model(model.name, self.node_id)
        for instance in snapshot.instances:
            self.store.register_instance(
                InstanceInfo(
                    instance_id=self.instance_id(instance.name),
                    node_id=self.node_id,
                    role=instance.role,
                    device=instance.device,
                    address=instance.address,
                )
            )

    def _model_states(self) -> dict[str, str]:
        """Per model of this node: in its host cache, being loaded, or on disk."""
        with self._registry_lock:
            loading = set(self._loading)
        states = {
            name: host_state(self.node.model_cache, facts.cache_key)
            for name, facts in self.node.models.copy().items()
        }
        return {**states, **dict.fromkeys(loading, LOADING)}

    def _publish(self) -> None:
        """Write this node's record: its models, their directories, contexts and states."""
        if self._draining.is_set():
            return  # it left the node list: writing its record again would route requests back to it
        snapshot = self.node.snapshot()
        states = self._model_states()
        self.store.register_node(
            NodeInfo(
                node_id=self.node_id,
                address=self.address,
                models=[model.name for model in snapshot.models],
                model_dirs={model.name: model.model_dir for model in snapshot.models},
                max_model_lens={model.name: model.max_model_len for model in snapshot.models},
                model_states=states,
                devices=len(snapshot.instances),
                host_cache_bytes=snapshot.model_cache.capacity,
            )
        )
        self._published_states = states

    # -- the live registry ---------------------------------------------------------------------------------

    def _follow_registry(self) -> None:
        """Serve the models added through the admin API before this node started (once, at start)."""
        try:
            records = self.store.registered_models()
        except MetadataStoreError as error:
            logger.warning("could not read the model registry: %s", error)
            return
        for record in records:
            if self._stopping.is_set():
                return
            if (
                record.source == FROM_ADMIN
                and record.state == MODEL_ACTIVE
                and record.name not in self.node.models
            ):
                try:
                    self._add_model(
                        record.name, record.path, record.ttft_s, record.tbt_s, record.pinned, record.priority
                    )
                except Exception as error:  # noqa: BLE001 - one model that fails to load must not stop the node
                    logger.warning("could not serve registered model %s: %s", record.name, error)

    def _add_model(
        self,
        name: str,
        path: str,
        ttft_s: float | None,
        tbt_s: float | None,
        pinned: bool,
        priority: float = DEFAULT_PRIORITY,
    ) -> None:
        """Serve `name` here; its SLO targets not given are the node's defaults."""
        default = self.node.config.scheduler.default_slo
        slo = (
            None
            if ttft_s is None and tbt_s is None
            else SLO(ttft_s or default.ttft_s, tbt_s or default.tbt_s)
        )
        with self._registry_lock:
            self._loading.add(name)
        self._publish()
        try:
            self.node.add_model(name, path, slo, pinned, priority)
        finally:
            with self._registry_lock:
                self._loading.discard(name)
            self._publish()
        self.store.place_model(name, self.node_id)
        logger.info("model %s added", name, extra={"model": name})

    def _remove_model(self, name: str, timeout_s: float) -> None:
        self.node.remove_model(name, timeout_s)
        self.store.unplace_model(name, self.node_id)
        self._publish()
        logger.info("model %s removed", name, extra={"model": name})

    def _command(self, identity: bytes, message: AddModel | RemoveModel) -> None:
        """Run an admin command off the socket thread (a model takes a while to load); answer `Done`."""
        error = None
        try:
            if isinstance(message, AddModel):
                self._add_model(
                    message.name,
                    message.path,
                    message.ttft_s,
                    message.tbt_s,
                    message.pinned,
                    message.priority,
                )
            else:
                self._remove_model(message.name, message.timeout_s)
        except Exception as exc:  # noqa: BLE001 - sent to the api server, which answers the admin with it
            logger.warning("%s of model %s failed: %s", type(message).__name__, message.name, exc)
            error = wire_error(exc)
        self._post(_Reply(identity, Done(message.command_id, error)))

    def _heartbeats(self) -> None:
        while not self._stopping.wait(self.heartbeat_interval_s):
            if self._model_states() != self._published_states:
                try:
                    self._publish()
                except MetadataStoreError as error:
                    logger.warning("could not update node %s: %s", self.node_id, error)
            for instance in self.node.snapshot().instances:
                load = {
                    LOAD_WAITING: instance.waiting,
                    LOAD_RUNNING: instance.running,
                    LOAD_KV_USAGE: instance.kv_usage_ratio,
                }
                try:
                    self.store.heartbeat(self.instance_id(instance.name), load, instance.resident)
                except MetadataStoreError as error:
                    logger.warning("heartbeat of %s failed: %s", instance.name, error)

    # -- the socket thread -------------------------------------------------------------------------------

    def _post(self, item: RequestDelta | _Moved | _Failure | _Reply) -> None:
        """Hand an item to the socket thread (called from the node's instance threads)."""
        self._outbox.put(item)
        os.write(self._wake_write, b"\0")

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        while not self._stopping.is_set():
            ready = dict(poller.poll(IDLE_POLL_MS))
            if self._wake_read in ready:
                try:
                    os.read(self._wake_read, 1 << 16)
                except BlockingIOError:
                    pass
            while self._socket.poll(0):
                frames = self._socket.recv_multipart()
                if len(frames) == 2:  # the sender's identity, one message
                    self._handle(*frames)
                else:
                    logger.warning("dropped a message of %d frames (a request is one)", len(frames) - 1)
            self._flush()

    def _handle(self, identity: bytes, payload: bytes) -> None:
        try:
            message = decode_api_message(payload)
        except WireDecodeError as error:
            # A peer that speaks another protocol (or an attacker) is ignored, not fatal.
            logger.warning(
                "dropped a %d-byte message that is not a request or an abort: %s", len(payload), error
            )
            return
        if isinstance(message, Submit):
            self._submit(identity, message)
        elif isinstance(message, Abort):
            self._abort(message.request_id)
        else:
            threading.Thread(target=self._command, args=(identity, message), daemon=True).start()

    def _submit(self, identity: bytes, message: Submit) -> None:
        request_id = message.request_id
        if self._draining.is_set():
            error = Draining(f"node {self.node_id} is shutting down; send the request to another node")
            self._send(identity, Rejected(request_id, wire_error(error)))
            return
        self._senders[request_id] = identity
        try:
            self.node.submit(
                message.prompt_token_ids,
                message.params,
                message.model,
                self._post,
                lambda error, request_id=request_id: self._post(_Failure(request_id, error)),
                request_id=request_id,
                output_token_ids=message.output_token_ids,
                finish_reasons=message.finish_reasons,
                key=message.key,
                key_weight=message.key_weight,
            )
        except (ValueError, KeyError, RuntimeError) as error:
            del self._senders[request_id]
            self._send(identity, Rejected(request_id, wire_error(error)))
            return
        self._send(identity, Accepted(request_id))

    def _abort(self, request_id: str) -> None:
        if self.node.abort(request_id):
            self._record(request_id, state=RequestState.ABORTED, finished_s=time.time())
        self._forget(request_id)

    def _flush(self) -> None:
        """Send everything the outbox holds (one output per request: its deltas merged), then record it."""
        newest: dict[str, RequestDelta] = {}
        others: list[_Moved | _Failure | _Reply] = []
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, RequestDelta):
                earlier = newest.get(item.request_id)
                newest[item.request_id] = item if earlier is None else earlier.merge(item)
            else:
                others.append(item)
        for output in newest.values():
            identity = self._senders.get(output.request_id)
            if identity is not None:
                self._send(identity, output_message(output))
        for item in others:
            if isinstance(item, _Reply):
                self._send(item.identity, item.message)
            elif isinstance(item, _Failure) and item.request_id in self._senders:
                self._send(self._senders[item.request_id], Failed(item.request_id, wire_error(item.error)))
        for item in others:
            if isinstance(item, _Moved):
                state = RequestState(item.state)  # the node names states as records do
                self._record(item.request_id, state=state, instance_id=self.instance_id(item.instance))
        for output in newest.values():
            self._record_output(output)
        for item in others:
            if isinstance(item, _Failure):
                self._record(
                    item.request_id, state=RequestState.FAILED, error=str(item.error), finished_s=time.time()
                )
                self._forget(item.request_id)

    def _send(self, identity: bytes, message) -> None:
        try:
            self._socket.send_multipart([identity, encode(message)], flags=zmq.NOBLOCK)
        except zmq.Again:
            # The api server is gone or not reading: its requests' outputs have nowhere to go.
            logger.warning("an api server is not reading; dropped a message for it")

    def _record_output(self, output: RequestDelta) -> None:
        request_id = output.request_id
        done = self._recorded.get(request_id, 0)
        first = next((seq for seq in output.outputs if seq.index == 0), None)  # records follow choice 0
        token_ids = first.token_ids if first is not None else []
        now = time.time()
        if token_ids:
            self._store_call(self.store.append_output, request_id, token_ids, now if done == 0 else None)
            self._recorded[request_id] = done + len(token_ids)
        if first is not None and first.finish_reason is not None:
            self._finish_reasons[request_id] = first.finish_reason
        if output.finished:
            reason = self._finish_reasons.get(request_id)
            self._record(request_id, state=RequestState.FINISHED, finished_s=now, finish_reason=reason)
            self._forget(request_id)

    def _record(self, request_id: str, **fields) -> None:
        self._store_call(self.store.update_request, request_id, **fields)

    def _store_call(self, method, *args, **kwargs) -> None:
        try:
            method(*args, **kwargs)
        except MetadataStoreError as error:
            # A record is bookkeeping: the request itself goes on without it.
            logger.warning("could not update a request record: %s", error)

    def _forget(self, request_id: str) -> None:
        self._senders.pop(request_id, None)
        self._recorded.pop(request_id, None)
        self._finish_reasons.pop(request_id, None)

    # -- lifecycle -----------------------------------------------------------------------------------

    def drain(self, timeout_s: float) -> bool:
        """Take no new requests and wait up to `timeout_s` for those in flight; True if all finished.

        The node leaves the store's node list first, so api servers stop routing to it, but its
        instances keep beating: the requests it still runs are not taken for lost.
        """
        self._draining.set()
        try:
            self.store.remove_node(self.node_id)
        except MetadataStoreError as error:
            logger.warning("could not deregister node %s: %s", self.node_id, error)
        deadline = time.monotonic() + timeout_s
        while self.node.snapshot().live and time.monotonic() < deadline:
            time.sleep(DRAIN_POLL_S)
        return not self.node.snapshot().live

    def close(self) -> None:
        """Stop serving and leave the store (the node's instances and placements with it)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        os.write(self._wake_write, b"\0")
        for thread in self._threads:
            thread.join(JOIN_TIMEOUT_S)
            if thread.is_alive():
                logger.warning("%s did not stop within %g s; closing anyway", thread.name, JOIN_TIMEOUT_S)
        self.node.on_state = None
        try:
            for instance in self.node.snapshot().instances:
                self.store.remove_instance(self.instance_id(instance.name))
            self.store.remove_node(self.node_id)
        except MetadataStoreError as error:
            logger.warning("could not deregister node %s: %s", self.node_id, error)
        if self._threads[0].is_alive():
            return  # a ZeroMQ socket must not be closed under the thread using it: the process exit frees it
        self._socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._context.term()  # every socket of the context is closed by now: this cannot wait
        os.close(self._wake_read)
        os.close(self._wake_write)

    def __enter__(self) -> NodeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
