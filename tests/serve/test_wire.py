"""The node's port: typed messages only, and with cluster keys only for api servers that hold them.

A user sees: a pickle sent to a node's port runs nothing (the node logs it, drops it and keeps
serving); with `aegaeon keys` keys, a client without them gets no answer at all, while an api server
with them serves completions; a node without keys will not listen beyond loopback unless told
`--insecure`.
"""

from __future__ import annotations

import logging
import pathlib
import pickle

import openai
import pytest
import zmq

from aegaeon.cli import main as cli_main
from aegaeon.config import MIB, EngineConfig, NodeConfig
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.instance.admission import Draining, Overloaded
from aegaeon.instance.node import Node
from aegaeon.serve.api_server import build_app
from aegaeon.serve.backend import ClusterBackend
from aegaeon.serve.keys import ClusterKeys, write_keys
from aegaeon.serve.metadata import MemoryStore
from aegaeon.serve.node_server import NodeServer
from aegaeon.serve.wire import (
    Accepted,
    Output,
    Submit,
    WireDecodeError,
    decode_api_message,
    decode_node_message,
    encode,
    raised_error,
    wire_error,
)
from tests.serve.http_server import ServerThread

KV_BYTES = 4 * MIB
TOKENS = 4
ANSWER_TIMEOUT_MS = 60_000
# How long a refused client waits to be sure no answer comes.
SILENCE_MS = 2_000


class CreatesFile:
    """Unpickling this creates a file: what an attacker's payload would do instead."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


@pytest.fixture(scope="module")
def node(five_model_dirs, profile_path):
    config = NodeConfig(profile_path=str(profile_path), engine=EngineConfig(kv_cache_bytes=KV_BYTES))
    with Node({"llama": five_model_dirs["llama"]}, config, progress=False) as node:
        yield node


@pytest.fixture
def keys(tmp_path) -> ClusterKeys:
    directory = tmp_path / "keys"
    cli_main(["keys", str(directory)])
    return ClusterKeys.load(directory)


def dealer(context: zmq.Context, address: str, client_keys: tuple[bytes, bytes, bytes] | None = None):
    """A plain DEALER on the node's port; `client_keys`: (public, secret, server public) for CURVE."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    if client_keys is not None:
        socket.curve_publickey, socket.curve_secretkey, socket.curve_serverkey = client_keys
    socket.connect(address)
    return socket


def submit(request_id: str) -> bytes:
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    return encode(Submit(request_id, "llama", [4, 5, 6], params))


def answers_until_finished(socket) -> list:
    messages = []
    while socket.poll(ANSWER_TIMEOUT_MS):
        message = decode_node_message(socket.recv())
        messages.append(message)
        if isinstance(message, Output) and message.output.finished:
            break
    return messages


def test_a_pickle_sent_to_the_node_runs_nothing_and_the_node_keeps_serving(node, tmp_path, caplog):
    target = tmp_path / "pwned"
    payload = pickle.dumps(CreatesFile(target))
    pickle.loads(payload)  # the payload is live: unpickled, it creates the file
    assert target.exists()
    target.unlink()

    context = zmq.Context()
    with (
        caplog.at_level(logging.WARNING, "aegaeon.serve.node_server"),
        NodeServer(node, MemoryStore()) as server,
    ):
        attacker = dealer(context, server.address)
        attacker.send(payload)
        attacker.send_multipart([b"two", b"frames"])
        client = dealer(context, server.address)
        client.send(submit("after-the-pickle"))
        messages = answers_until_finished(client)
        attacker.close()
        client.close()
    context.term()
    assert not target.exists()
    assert any("dropped" in record.getMessage() for record in caplog.records)
    assert isinstance(messages[0], Accepted) and messages[0].request_id == "after-the-pickle"
    outputs = [message.output for message in messages[1:]]  # deltas: each holds what is new
    assert outputs[-1].finished and sum(len(delta.outputs[0].token_ids) for delta in outputs) == TOKENS


def test_with_cluster_keys_only_a_client_holding_them_is_served(node, keys):
    context = zmq.Context()
    with NodeServer(node, MemoryStore(), keys=keys) as server:
        plain = dealer(context, server.address)
        strangers = zmq.curve_keypair()  # a client that knows the node's public key, not the api key
        stranger = dealer(context, server.address, (*strangers, keys.node_public))
        for socket in (plain, stranger):
            socket.send(submit("unauthorised"))
        assert not plain.poll(SILENCE_MS) and not stranger.poll(SILENCE_MS)
        holder = dealer(context, server.address, (keys.api_public, keys.for_api(), keys.node_public))
        holder.send(submit("authorised"))
        messages = answers_until_finished(holder)
        for socket in (plain, stranger, holder):
            socket.close()
    context.term()
    assert isinstance(messages[0], Accepted) and messages[-1].output.finished


def test_an_api_server_with_the_keys_serves_completions_through_curve(node, keys):
    store = MemoryStore()
    with (
        NodeServer(node, store, keys=keys),
        ServerThread(build_app(ClusterBackend(store, keys=keys))) as server,
    ):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        completion = client.completions.create(
            model="llama", prompt=[4, 5, 6], max_tokens=TOKENS, temperature=0
        )
        assert completion.usage.completion_tokens == TOKENS


def test_a_node_without_keys_listens_beyond_loopback_only_when_told_insecure(node):
    with pytest.raises(ValueError, match="--insecure"):
        NodeServer(node, MemoryStore(), host="0.0.0.0")
    with NodeServer(node, MemoryStore(), host="0.0.0.0", insecure=True) as server:
        assert server.address.startswith("tcp://")


def test_errors_cross_the_wire_as_their_allowed_class():
    overloaded = raised_error(wire_error(Overloaded("too many waiting", 7)))
    assert isinstance(overloaded, Overloaded) and overloaded.retry_after_s == 7
    missing = raised_error(wire_error(KeyError("model 'x' is not served here")))
    assert isinstance(missing, KeyError) and missing.args == ("model 'x' is not served here",)
    assert isinstance(raised_error(wire_error(Draining("bye"))), Draining)
    other = raised_error(wire_error(OSError("disk full")))
    assert type(other) is RuntimeError and str(other) == "OSError: disk full"
    for payload in (b"", b"\x80\x04not msgpack", encode(Accepted("r"))):
        with pytest.raises(WireDecodeError):
            decode_api_message(payload)


def test_keys_are_written_with_private_secrets(tmp_path):
    paths = write_keys(tmp_path / "k")
    secrets = [path for path in paths if path.name.endswith("_secret")]
    assert len(secrets) == 2 and all(path.stat().st_mode & 0o077 == 0 for path in secrets)
    with pytest.raises(ValueError, match="node.key"):
        ClusterKeys.load(tmp_path)
