"""Swapping several requests at once: one call, one move, and every request continues exactly.

What a user relies on: however a batch of requests goes off the device and comes back together
(all of its KV kept in the host pool, only part of it when the pool is small, or back in only as far
as the device has room), each request goes on to generate exactly what `transformers` generates, and
the host pool ends empty.
"""

from __future__ import annotations

import random

import pytest

from aegaeon.config import MIB, EngineConfig
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.kv_cache import kv_block_bytes
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.memory.kv_pool import HostKVPool
from aegaeon.scheduler.models import blocks_for_tokens

MODEL = "qwen3"  # grouped-query attention: K/V heads fewer than query heads
REQUESTS = 4
OUTPUT_TOKENS = 20
STEPS_BEFORE_SWAP = 6
KV_BYTES = 4 * MIB
SMALL_KV_BLOCKS = 24  # a device KV region a little larger than the batch's KV


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, 900) for _ in range(rng.randint(20, 60))] for _ in range(REQUESTS)]


@pytest.fixture(scope="module")
def references(five_model_dirs, prompts, hf_greedy) -> dict[str, list[int]]:
    return {
        f"r{i}": hf_greedy(five_model_dirs[MODEL], prompt, OUTPUT_TOKENS) for i, prompt in enumerate(prompts)
    }


def engine_with_pool(
    path, tmp_path, pool_bytes: int, kv_bytes: int = KV_BYTES
) -> tuple[LLMEngine, HostKVPool]:
    pool = HostKVPool.create(tmp_path, "kv-pool", nbytes=pool_bytes, slab_bytes=min(pool_bytes, 1 * MIB))
    engine = LLMEngine(path, config=EngineConfig(kv_cache_bytes=kv_bytes), kv_pool=pool, progress=False)
    return engine, pool


def model_block_bytes(path) -> int:
    probe = LLMEngine(path, config=EngineConfig(kv_cache_bytes=KV_BYTES), progress=False)
    return kv_block_bytes(probe.model().arch, probe.dtype)


def step(engine: LLMEngine, generated: dict[str, list[int]]) -> None:
    for delta in engine.step():
        generated.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)


def drain(engine: LLMEngine, generated: dict[str, list[int]], request_ids: list[str]) -> None:
    """Step until these requests have finished."""
    while set(request_ids) & set(engine.requests_of(engine.model().name)):
        step(engine, generated)


def start(engine: LLMEngine, prompts: list[list[int]]) -> tuple[list[str], dict[str, list[int]]]:
    """Add the requests and run them a few steps: all on the device, part-way through."""
    ids = [f"r{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, greedy())
    generated: dict[str, list[int]] = {}
    for _ in range(STEPS_BEFORE_SWAP):
        step(engine, generated)
    assert all(engine.on_device(request_id) for request_id in ids)
    return ids, generated


def test_a_batch_swapped_out_and_in_together_continues_exactly(
    five_model_dirs, prompts, references, tmp_path
):
    engine, pool = engine_with_pool(five_model_dirs[MODEL], tmp_path, pool_bytes=8 * MIB)
    with pool:
        ids, generated = start(engine, prompts)
        engine.swap_out(*ids)
        assert not any(engine.on_device(request_id) for request_id in ids)
        served = engine.model()
        assert served.batcher.allocator.num_free == served.num_blocks  # every device block given back
        assert pool.stats().allocated_bytes > 0
        # Other requests overwrite the device blocks the batch had.
        engine.add_request("other", prompts[0][::-1], greedy())
        drain(engine, {}, ["other"])

        assert engine.swap_in(*ids) == ids
        assert engine.swap_in(*ids) == []  # nothing left swapped out
        drain(engine, generated, ids)
        assert generated == references
        assert pool.stats().allocated_bytes == 0


def test_a_pool_that_holds_part_of_a_batch_keeps_what_fits_and_the_rest_is_recomputed(
    five_model_dirs, prompts, references, tmp_path
):
    block_bytes = model_block_bytes(five_model_dirs[MODEL])
    # Room for the two smallest requests' KV and not much more.
    needs = sorted(blocks_for_tokens(len(prompt) + STEPS_BEFORE_SWAP) for prompt in prompts)
    engine, pool = engine_with_pool(
        five_model_dirs[MODEL], tmp_path, pool_bytes=(needs[0] + needs[1]) * block_bytes
    )
    with pool:
        ids, generated = start(engine, prompts)
        engine.swap_out(*ids)
        kept = pool.stats().allocated_bytes // block_bytes
        assert 0 < kept < sum(needs), "the pool should hold part of the batch"
        assert engine.swap_in(*ids) == ids  # kept KV moves in, dropped KV is recomputed
        drain(engine, generated, ids)
        assert generated == references
        assert pool.stats().allocated_bytes == 0


def test_a_device_with_room_for_part_of_a_batch_takes_what_fits_and_the_rest_waits(
    five_model_dirs, prompts, references, tmp_path
):
    engine, pool = engine_with_pool(
        five_model_dirs[MODEL],
        tmp_path,
        pool_bytes=8 * MIB,
        kv_bytes=SMALL_KV_BLOCKS * model_block_bytes(five_model_dirs[MODEL]),
    )
    with pool:
        ids, generated = start(engine, prompts)
        engine.swap_out(*ids)
        served = engine.model()
        # Another request takes all but the room of one of the batch.
        smallest = min(len(prompt) for prompt in prompts) + STEPS_BEFORE_SWAP
        hog_tokens = (served.num_blocks - blocks_for_tokens(smallest)) * 16 - 1
        engine.add_request(
            "hog", [5] * hog_tokens, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        )
        while not engine.on_device("hog"):
            step(engine, {})
        placed = engine.swap_in(*ids)
        assert 0 < len(placed) < len(ids)
        drain(engine, generated, ["hog", *placed])
        rest = [request_id for request_id in ids if request_id not in placed]
        assert engine.swap_in(*rest) == rest
        drain(engine, generated, rest)
        assert {request_id: generated[request_id] for request_id in ids} == references
        assert pool.stats().allocated_bytes == 0
