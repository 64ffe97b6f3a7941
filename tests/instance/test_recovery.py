"""An instance process that dies mid-stream: the node restarts it and no request is lost or changed.

A user sees: 20 requests streaming from an instance whose process is killed (SIGKILL, as the OOM
killer would) all finish, with exactly the tokens an undisturbed run gives; every streamed output is
a prefix of the final one (nothing a client already showed is taken back).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.instance.node import Node
from aegaeon.scheduler.timeline import EventKind
from tests.instance.test_node import node_config

MODELS = ("llama", "qwen3")
REQUESTS = 20
OUTPUT_TOKENS = 32
# Kill once this many outputs have streamed in all: every request is well under way, none is done.
KILL_AFTER_OUTPUTS = 2 * REQUESTS
FINISH_TIMEOUT_S = 180.0


class Streams:
    """Submit interleaved requests of both models; collect the tokens each one streams."""

    def __init__(self, node: Node, requests: int = REQUESTS, output_tokens: int = OUTPUT_TOKENS):
        self.requests = requests
        self.prompts: dict[str, tuple[str, list[int]]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.outputs_seen = 0
        self.finished = 0
        self.errors: list[BaseException] = []
        self.done = threading.Event()
        self._lock = threading.Lock()
        params = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True)
        for index in range(requests):
            request_id, model = f"r{index}", MODELS[index % len(MODELS)]
            prompt = [3 + index, 7, 11 + 2 * index, 5]
            self.prompts[request_id] = (model, prompt)
            self.tokens[request_id] = []
            node.submit(prompt, params, model, self._on_output, self._on_error, request_id)

    def _on_output(self, output) -> None:
        with self._lock:
            self.tokens[output.request_id].extend(output.outputs[0].token_ids)
            self.outputs_seen += 1
            self.finished += output.finished
            if self.finished == self.requests:
                self.done.set()

    def _on_error(self, error: BaseException) -> None:
        self.errors.append(error)
        self.done.set()

    def final(self) -> dict[str, list[int]]:
        return self.tokens


@pytest.mark.parametrize(
    ("layout", "victim"),
    [({"colocated": True}, "colocated-0"), ({"colocated": False}, "decode-1")],
    ids=["colocated", "decode-instance"],
)
def test_killed_instance_process_is_restarted_and_every_stream_finishes_unchanged(
    five_model_dirs, profile_path, layout, victim
):
    models = {name: five_model_dirs[name] for name in MODELS}
    with Node(models, node_config(profile_path, **layout), progress=False) as node:
        undisturbed = Streams(node)
        assert undisturbed.done.wait(FINISH_TIMEOUT_S) and not undisturbed.errors

        instance = next(i for i in node.instances if i.instance_name == victim)
        old_pid = instance.engine.info.pid
        disturbed = Streams(node)
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while disturbed.outputs_seen < KILL_AFTER_OUTPUTS and time.monotonic() < deadline:
            time.sleep(0.005)
        assert disturbed.finished < REQUESTS, "the kill came too late to test anything"
        os.kill(old_pid, signal.SIGKILL)

        assert disturbed.done.wait(FINISH_TIMEOUT_S), "requests hung after the instance died"
        assert not disturbed.errors, disturbed.errors
        # Every token streamed once, in order: none lost or repeated across the restart.
        assert disturbed.final() == undisturbed.final()
        assert instance.engine.info.pid != old_pid
        assert instance.timeline.of_kind(EventKind.RESTART)
        assert node.error is None
