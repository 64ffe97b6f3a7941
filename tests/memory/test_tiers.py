"""Disk -> host model cache -> device: more models than the host cache holds, served exactly.

What a user sees: eight models behind a host cache with room for two of them still all answer
exactly what transformers answers, the cache reads evicted models back from disk (and says so in
its statistics and the node's metrics) and never holds more bytes than its size; two engines
wanting the same model read it once; a switch waits for room rather than overfilling the cache.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from aegaeon.config import MIB, SLO, EngineConfig, MemoryConfig, NodeConfig, SchedulerConfig
from aegaeon.engine.architecture import Architecture
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.residency import weight_bytes
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.weights import canonical_shapes, canonical_sources, checkpoint_pieces
from aegaeon.instance.node import Node
from aegaeon.memory.checkpoint import read_pieces
from aegaeon.memory.model_cache import HostModelCache, ModelCacheFullError, plan_layout, tensor_views
from aegaeon.serve.metrics import NodeMetrics, render

OUTPUT_TOKENS = 6
KV_BYTES = 2 * MIB
# Eight models of one size (two families, four seeds each), so a cache of two models' bytes holds
# exactly two of them.
EIGHT = {f"{arch}-{seed}": dict(arch=arch, seed=seed) for arch in ("llama", "mistral") for seed in range(4)}


@pytest.fixture(scope="module")
def eight_dirs(make_demo_model):
    return {name: make_demo_model(**kwargs) for name, kwargs in EIGHT.items()}


def model_bytes(path) -> int:
    return weight_bytes(Architecture.from_pretrained(path), torch.float32)


def prompt_for(index: int) -> list[int]:
    return [5 + index, 40 + 3 * index, 7, 300 + index, 11]


def test_eight_models_through_a_host_cache_of_two_are_exact(eight_dirs, hf_greedy, tmp_path):
    sizes = {model_bytes(path) for path in eight_dirs.values()}
    assert len(sizes) == 1
    cache = HostModelCache.create(tmp_path, 2 * sizes.pop())
    engine = LLMEngine(
        models=eight_dirs, config=EngineConfig(kv_cache_bytes=KV_BYTES), model_cache=cache, progress=False
    )
    names = list(eight_dirs)
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        engine.add_request(name, prompt_for(index), params, model=name)
    # One step per turn, the models in turn, prefetching the next one: every turn switches, and
    # a switch (or prefetch) finds its model evicted from the host cache most of the time.
    while engine.has_unfinished_requests():
        pending = [name for name in names if engine.has_unfinished_requests(name)]
        for position, name in enumerate(pending):
            engine.switch_to(name)
            for delta in engine.step():
                outputs.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
            engine.prefetch(pending[(position + 1) % len(pending)])
            stats = cache.stats()
            assert stats.used <= stats.capacity
    for index, name in enumerate(names):
        assert outputs[name] == hf_greedy(eight_dirs[name], prompt_for(index), OUTPUT_TOKENS), name
    stats = cache.stats()
    assert stats.models <= 2
    assert stats.disk_loads > len(names) and stats.evictions >= stats.disk_loads - 2
    assert stats.loaded_bytes == stats.disk_loads * model_bytes(eight_dirs[names[0]])
    assert engine.residency.last_switch is not None


def test_a_node_reloads_evicted_models_and_its_metrics_say_so(eight_dirs, hf_greedy, profile_path):
    three = {name: eight_dirs[name] for name in ("llama-0", "llama-1", "llama-2")}
    one = model_bytes(three["llama-0"])
    config = NodeConfig(
        profile_path=str(profile_path),
        scheduler=SchedulerConfig(default_slo=SLO(ttft_s=60.0, tbt_s=5.0)),
        engine=EngineConfig(kv_cache_bytes=KV_BYTES),
        memory=MemoryConfig(
            cpu_arena_bytes=KV_BYTES + one + one // 2,  # one model on the device at a time
            host_model_cache_bytes=2 * one,
            host_kv_pool_bytes=16 * MIB,
            kv_slab_bytes=4 * MIB,
        ),
    )
    node = Node(three, config, progress=False)
    try:
        done, outputs, errors = threading.Event(), {}, []
        params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)

        def on_output(output):
            outputs.setdefault(output.request_id, []).extend(output.outputs[0].token_ids)
            if output.finished and sum(len(v) for v in outputs.values()) == 2 * 3 * OUTPUT_TOKENS:
                done.set()

        def on_error(error):
            errors.append(error)
            done.set()

        for round_ in range(2):
            for index, name in enumerate(three):
                node.submit(prompt_for(index), params, name, on_output, on_error, f"{name}-{round_}")
        assert done.wait(120) and not errors
        for round_ in range(2):
            for index, (name, path) in enumerate(three.items()):
                assert outputs[f"{name}-{round_}"] == hf_greedy(path, prompt_for(index), OUTPUT_TOKENS)
        text = render(NodeMetrics(node).registry)[0].decode()
        values = {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("aegaeon_host_model_cache")
        }
        assert values["aegaeon_host_model_cache_disk_loads_total"] > 3
        assert values["aegaeon_host_model_cache_evictions_total"] >= 1
        assert (
            values["aegaeon_host_model_cache_used_bytes"] <= values["aegaeon_host_model_cache_capacity_bytes"]
        )
        assert values["aegaeon_host_model_cache_loaded_bytes_total"] >= 4 * one
    finally:
        node.close()


SHAPES = {"w": (256, 64)}


def slow_fill(started: threading.Event, release: threading.Event, calls: list):
    def fill(entry, model, progress):
        calls.append(1)
        started.set()
        release.wait(10)
        tensor_views(entry, 0, model)["w"].fill_(7.0)

    return fill


def test_concurrent_acquires_share_one_read_and_the_state_follows_it(tmp_path):
    cache = HostModelCache.create(tmp_path, 2 * plan_layout(SHAPES, torch.float32)[1])
    started, release, calls, results = threading.Event(), threading.Event(), [], []
    fill = slow_fill(started, release, calls)
    assert cache.state("m") is None
    threads = [
        threading.Thread(
            target=lambda: results.append(cache.acquire("m", SHAPES, torch.float32, fill, False))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    assert started.wait(10)
    assert cache.state("m") == "loading"
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1 and len(results) == 3 and cache.state("m") == "host"
    assert torch.equal(
        tensor_views(cache.buffer, results[0].offset, results[0])["w"], torch.full((256, 64), 7.0)
    )
    stats = cache.stats()
    assert stats.disk_loads == 1 and stats.loaded_bytes == results[0].nbytes
    cache.close()


def test_with_every_model_pinned_an_acquire_waits_for_a_release_and_never_overfills(tmp_path):
    one = plan_layout(SHAPES, torch.float32)[1]
    cache = HostModelCache.create(tmp_path, 2 * one)
    never = threading.Event()
    never.set()
    for key in ("a", "b"):
        cache.acquire(key, SHAPES, torch.float32, slow_fill(threading.Event(), never, []), False)  # pinned
    with pytest.raises(ModelCacheFullError, match="host_model_cache_bytes"):
        cache.acquire("c", SHAPES, torch.float32, slow_fill(threading.Event(), never, []), False, wait_s=0.05)
    assert cache.stats().used <= cache.stats().capacity
    threading.Timer(0.2, cache.unpin, args=("a",)).start()
    start = time.monotonic()
    cache.acquire("c", SHAPES, torch.float32, slow_fill(threading.Event(), never, []), False, wait_s=10)
    assert time.monotonic() - start >= 0.15
    assert cache.state("a") is None and cache.state("b") == "host" and cache.state("c") == "host"
    assert cache.stats().used == cache.stats().capacity
    cache.close()


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_a_sharded_checkpoint_is_read_into_the_canonical_layout(make_demo_model, tmp_path, stored):
    path = make_demo_model("qwen2", max_shard_bytes=200_000, dtype=str(stored).removeprefix("torch."))
    arch = Architecture.from_pretrained(path)
    hf = {}
    for file in sorted(path.glob("*.safetensors")):
        hf.update(load_file(file))
    slots, nbytes = plan_layout(canonical_shapes(arch), torch.float32)
    entry = torch.zeros(nbytes, dtype=torch.uint8)
    pieces = checkpoint_pieces(path, arch, torch.float32, slots)
    seen = []
    read_pieces(pieces, entry, threads=4, chunk_bytes=4096, progress=seen.append)
    assert sum(seen) == sum(p.source.nbytes * 4 // p.source.dtype.itemsize for p in pieces)
    layout = type("Layout", (), {"dtype": torch.float32, "tensors": slots})
    views = tensor_views(entry, 0, layout)
    for name, sources in canonical_sources(arch).items():
        expected = torch.cat([hf[source].to(torch.float32) for source in sources])
        assert torch.equal(views[name], expected), name


def test_a_truncated_checkpoint_fails_the_registration(make_demo_model, tmp_path):
    source = make_demo_model("llama")
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            (broken / file.name).write_bytes(file.read_bytes())
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match="up_proj"):
        LLMEngine(broken, config=EngineConfig(kv_cache_bytes=KV_BYTES), progress=False)
