"""A node whose instance runs tensor-parallel (two rank processes, gloo on the CPU).

A user sees: two models served by one TP=2 colocated instance, switched token by token, answer
every interleaved request exactly as transformers does; and when one rank's process is killed
mid-stream (as the OOM killer would), the instance restarts and every stream finishes with the
tokens an undisturbed run gives, none lost or repeated.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from aegaeon.cli import build_parser, serve_config_from_args
from aegaeon.instance.node import Node
from aegaeon.scheduler.timeline import EventKind
from tests.instance.test_node import node_config
from tests.instance.test_recovery import MODELS, Streams

REQUESTS = 6
OUTPUT_TOKENS = 12
# Kill once this many outputs have streamed in all: every request under way, none done.
KILL_AFTER_OUTPUTS = 2 * REQUESTS
FINISH_TIMEOUT_S = 300.0


def test_tp2_instance_switches_models_exactly_and_survives_a_killed_rank(
    five_model_dirs, profile_path, hf_greedy
):
    models = {name: five_model_dirs[name] for name in MODELS}
    config = node_config(profile_path, colocated=True, tensor_parallel_size=2)
    with Node(models, config, progress=False) as node:
        undisturbed = Streams(node, REQUESTS, OUTPUT_TOKENS)
        assert undisturbed.done.wait(FINISH_TIMEOUT_S) and not undisturbed.errors, undisturbed.errors
        for request_id, (model, prompt) in undisturbed.prompts.items():
            assert undisturbed.tokens[request_id] == hf_greedy(models[model], prompt, OUTPUT_TOKENS)
        instance = node.instances[0]
        assert instance.timeline.of_kind(EventKind.SWITCH), "the instance never switched models"

        old_pid = instance.engine.info.pid
        ranks = psutil.Process(old_pid).children()
        assert len(ranks) == 1  # rank 1; rank 0 is the instance process itself
        disturbed = Streams(node, REQUESTS, OUTPUT_TOKENS)
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while disturbed.outputs_seen < KILL_AFTER_OUTPUTS and time.monotonic() < deadline:
            time.sleep(0.005)
        assert disturbed.finished < REQUESTS, "the kill came too late to test anything"
        os.kill(ranks[0].pid, signal.SIGKILL)

        assert disturbed.done.wait(FINISH_TIMEOUT_S), "requests hung after a rank died"
        assert not disturbed.errors, disturbed.errors
        assert disturbed.tokens == undisturbed.tokens
        assert instance.engine.info.pid != old_pid
        assert instance.timeline.of_kind(EventKind.RESTART)
        assert node.error is None
        # No rank outlives its instance: the old one's processes are all gone.
        assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE


def test_tp2_prefill_and_decode_instances_hand_requests_over_exactly(
    five_model_dirs, profile_path, hf_greedy
):
    """Each prefill rank writes its part of the host KV blocks; the decode instance's ranks read theirs."""
    models = {name: five_model_dirs[name] for name in MODELS}
    config = node_config(profile_path, colocated=False, tensor_parallel_size=2)
    with Node(models, config, progress=False) as node:
        streams = Streams(node, REQUESTS, OUTPUT_TOKENS)
        assert streams.done.wait(FINISH_TIMEOUT_S) and not streams.errors, streams.errors
        for request_id, (model, prompt) in streams.prompts.items():
            assert streams.tokens[request_id] == hf_greedy(models[model], prompt, OUTPUT_TOKENS)
        decode = next(i for i in node.instances if i.instance_name.startswith("decode"))
        assert decode.timeline.of_kind(EventKind.SWITCH)


def test_serve_flag_and_yaml_key_set_the_instances_tensor_parallel_size(tmp_path):
    flag = build_parser().parse_args(["serve", "m=/models/m", "--tensor-parallel-size", "2"])
    assert serve_config_from_args(flag).node.tensor_parallel_size == 2
    settings = tmp_path / "serve.yaml"
    settings.write_text("models: {m: /models/m}\ntensor_parallel_size: 4\n")
    yaml = build_parser().parse_args(["serve", "--config", str(settings)])
    assert serve_config_from_args(yaml).node.tensor_parallel_size == 4
    zero = build_parser().parse_args(["serve", "m=/models/m", "--tensor-parallel-size", "0"])
    with pytest.raises(SystemExit, match="tensor_parallel_size must be >= 1"):
        serve_config_from_args(zero)
