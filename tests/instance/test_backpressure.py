"""KV memory as back-pressure, never failure; a prefill's KV handed over outside the node's lock.

A user sees: a burst over several models whose KV overflows a small host KV pool ends with every
request either complete, token for token what transformers gives, or refused at once with a retry
hint; nothing fails for lack of memory, and the node serves the next request normally. And while a
prefill instance hands a request's KV over, the other instances keep generating.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from aegaeon.config import NodeConfig
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.instance.admission import Overloaded
from aegaeon.instance.node import Node
from tests.instance.test_admission import Outcomes
from tests.instance.test_node import node_config

MODELS = ("llama", "qwen3", "mistral")
PER_MODEL = 8
WAITING_LIMIT = 6  # per model: part of each model's burst is refused
TOKENS = 24
# Two slabs of 64 KiB: a few requests' KV, far less than a switch swaps out mid-burst.
SLAB_BYTES = 64 * 1024
POOL_BYTES = 2 * SLAB_BYTES
TIMEOUT_S = 240.0


def small_pool_config(profile_path) -> NodeConfig:
    config = node_config(profile_path, max_waiting_per_model=WAITING_LIMIT)
    memory = dataclasses.replace(config.memory, host_kv_pool_bytes=POOL_BYTES, kv_slab_bytes=SLAB_BYTES)
    return dataclasses.replace(config, memory=memory)


def prompt(index: int) -> list[int]:
    return [7 + index, 100 + 3 * index, 250, 31 + index, 5, 900 - index]


def test_a_burst_over_a_tiny_host_kv_pool_completes_exactly_or_is_refused(
    five_model_dirs, hf_greedy, profile_path
):
    models = {name: five_model_dirs[name] for name in MODELS}
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    with Node(models, small_pool_config(profile_path), progress=False) as node:
        outcomes, refused, expected = Outcomes(), [], {}
        for index in range(PER_MODEL):
            for model in MODELS:
                request_id = f"{model}-{index}"
                try:
                    on_error = outcomes.on_error(request_id)
                    node.submit(prompt(index), params, model, outcomes.on_output, on_error, request_id)
                except Overloaded as error:
                    refused.append(error)
                    continue
                outcomes.accepted += 1
                expected[request_id] = (model, prompt(index))
        assert outcomes.all_done.wait(TIMEOUT_S), "an accepted request went unanswered"
        assert not outcomes.failed, outcomes.failed
        assert refused and all(error.retry_after_s >= 1 for error in refused)
        assert len(outcomes.finished) + len(refused) == PER_MODEL * len(MODELS)
        # More KV than the pool holds had to leave the device: some was dropped and recomputed.
        kv_block_bytes = max(node.specs[model].kv_block_bytes for model in MODELS)
        assert outcomes.accepted * -(-(6 + TOKENS) // 16) * kv_block_bytes > 3 * POOL_BYTES

        after = Outcomes()
        after.accepted = 1
        node.submit(prompt(99), params, "qwen3", after.on_output, after.on_error("after"), "after")
        assert after.all_done.wait(TIMEOUT_S) and not after.failed and node.error is None
        assert node.kv_pool.stats().allocated_bytes == 0
    for request_id, output in outcomes.finished.items():
        model, tokens = expected[request_id]
        assert output.outputs[0].token_ids == hf_greedy(five_model_dirs[model], tokens, TOKENS), request_id
    expected_after = hf_greedy(five_model_dirs["qwen3"], prompt(99), TOKENS)
    assert after.finished["after"].outputs[0].token_ids == expected_after


def test_a_slow_kv_export_does_not_stop_another_instance_from_stepping(five_model_dirs, profile_path):
    """The export of a prefill's KV is made slow on purpose (its engine call waits for the test):
    meanwhile a decode instance's request keeps receiving tokens, so the node's lock is free."""
    config = node_config(profile_path, colocated=False, prefill_instances=1, decode_instances=2)
    models = {name: five_model_dirs[name] for name in ("llama", "qwen3")}
    with Node(models, config, progress=False) as node:
        prefill = node.instances[0]
        tokens: list[float] = []
        first = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        node.submit([5, 6, 7], first, "llama", lambda _: tokens.append(time.monotonic()), request_id="long")
        deadline = time.monotonic() + TIMEOUT_S
        while len(tokens) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)

        exporting, release = threading.Event(), threading.Event()
        export = prefill.engine.export_request

        def slow_export(request_id: str):
            exporting.set()
            release.wait(TIMEOUT_S)
            return export(request_id)

        prefill.engine.export_request = slow_export
        finished = threading.Event()
        second = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        node.submit(
            [9, 8, 7], second, "qwen3", lambda output: output.finished and finished.set(), request_id="handed"
        )
        assert exporting.wait(TIMEOUT_S)
        during = len(tokens)
        while len(tokens) < during + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        stepped = len(tokens) - during
        release.set()
        assert stepped >= 3, "no decode step ran while a prefill instance exported KV"
        assert finished.wait(TIMEOUT_S), "the request handed over never finished"
        assert node.abort("long")
