"""What a node sends an api server per output stays small however long the generation is."""

from __future__ import annotations

import zmq

from aegaeon.config import EngineConfig, NodeConfig
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.instance.node import Node
from aegaeon.serve.metadata import MemoryStore
from aegaeon.serve.node_server import NodeServer
from aegaeon.serve.wire import Accepted, Output, Submit, decode_node_message, encode
from tests.instance.test_worker import FINISH_BYTES, PROMPT, TOKENS, one_token_bytes

RECEIVE_TIMEOUT_MS = 120_000


def test_an_output_message_does_not_grow_with_the_generation(make_demo_model, profile_path):
    model_dir = make_demo_model("llama", max_position_embeddings=TOKENS + 2 * len(PROMPT))
    config = NodeConfig(
        profile_path=str(profile_path), engine=EngineConfig(max_model_len=TOKENS + len(PROMPT))
    )
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, RECEIVE_TIMEOUT_MS)
    with (
        Node({"llama": model_dir}, config, progress=False) as node,
        NodeServer(node, MemoryStore()) as server,
    ):
        socket.connect(server.address)
        socket.send(encode(Submit("long", "llama", PROMPT, params)))
        assert isinstance(decode_node_message(socket.recv()), Accepted)
        sizes, carried, finished = [], [], False
        while not finished:
            payload = socket.recv()  # the bytes on the wire, as the api server reads them
            message = decode_node_message(payload)
            assert isinstance(message, Output)
            sizes.append(len(payload))
            carried.append(len(message.output.outputs[0].token_ids))
            finished = message.output.finished
        tokenizer = node.tokenizers["llama"]
    socket.close()
    context.term()
    assert sum(carried) == TOKENS
    # The node server merges the outputs that wait for it: a message may carry several tokens, and
    # is as large as the tokens it carries make it, never larger for coming late in the generation.
    bound = sizes[0] + FINISH_BYTES + carried[-1] * one_token_bytes(tokenizer)
    assert sizes[-1] <= bound, (sizes[:3], sizes[-3:], carried[-3:])
