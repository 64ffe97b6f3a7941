"""Model switching inside one engine: weights in the arena, KV swapped through the host pool.

The promises a user notices: any number of switches among models of different shapes leaves every
model generating exactly what `transformers` generates, the arena never grows and the switch path
allocates nothing outside it, and a request moved to host memory mid-generation (even while other
models ran) continues with exactly the tokens it would have produced.
"""

from __future__ import annotations

import random

import pytest
from torch.profiler import ProfilerActivity, profile

from aegaeon.config import MIB, EngineConfig, MemoryConfig
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.memory.kv_pool import HostKVPool

RANDOM_SWITCHES = 1000
OUTPUT_TOKENS = 24
PROMPTS_PER_MODEL = 2
KV_BYTES = 4 * MIB


def greedy(max_tokens: int = OUTPUT_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dirs(five_model_dirs):
    return five_model_dirs


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(7)
    return [[rng.randrange(3, 900) for _ in range(rng.randint(3, 40))] for _ in range(PROMPTS_PER_MODEL)]


@pytest.fixture(scope="module")
def references(model_dirs, prompts, hf_greedy):
    """transformers' greedy continuation of every prompt, per model."""
    return {name: [hf_greedy(path, p, OUTPUT_TOKENS) for p in prompts] for name, path in model_dirs.items()}


@pytest.fixture()
def kv_pool(tmp_path):
    pool = HostKVPool.create(tmp_path, "kv-pool", nbytes=16 * MIB, slab_bytes=1 * MIB)
    yield pool
    pool.close()


def make_engine(model_dirs, kv_pool, resident_models: float = 1.5) -> LLMEngine:
    """An engine whose arena holds the KV region and about `resident_models` models: switches evict."""
    probe = LLMEngine(models=model_dirs, config=EngineConfig(kv_cache_bytes=KV_BYTES), progress=False)
    largest = max(m.weight_bytes for m in probe.models.values())
    memory = MemoryConfig(cpu_arena_bytes=KV_BYTES + int(resident_models * largest))
    return LLMEngine(
        models=model_dirs,
        config=EngineConfig(kv_cache_bytes=KV_BYTES),
        memory=memory,
        kv_pool=kv_pool,
        progress=False,
    )


def allocated_bytes_while(action) -> int:
    """Bytes of tensor storage the CPU allocator handed out while `action()` ran."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        action()
    return sum(event.cpu_memory_usage for event in prof.events() if event.cpu_memory_usage > 0)


def test_random_switches_keep_outputs_exact_and_memory_flat(model_dirs, prompts, references, kv_pool):
    engine = make_engine(model_dirs, kv_pool)
    names = list(model_dirs)
    rng = random.Random(11)
    finished: dict[str, list[int]] = {}
    expected: dict[str, list[int]] = {}
    counter = 0

    def keep_two_requests_per_model() -> None:
        nonlocal counter
        for name in names:
            while len(engine.requests_of(name)) < PROMPTS_PER_MODEL:
                index = counter % PROMPTS_PER_MODEL
                request_id = f"{name}-{counter}"
                engine.add_request(request_id, prompts[index], greedy(), model=name)
                expected[request_id] = references[name][index]
                counter += 1

    high_water = None
    generated: dict[str, list[int]] = {}
    outside = []
    for switch in range(RANDOM_SWITCHES):
        keep_two_requests_per_model()
        name = rng.choice(names)
        outside.append(allocated_bytes_while(lambda name=name: engine.switch_to(name)))
        for request_id in engine.requests_of(name):
            engine.swap_in(request_id)
        for request_id in step(engine, generated):
            finished[request_id] = generated[request_id]
        for request_id in engine.requests_of(name):
            engine.swap_out(request_id)
        if switch == len(names) * 4:  # every model has been loaded and evicted by now
            high_water = engine.residency.arena.stats().high_water
    assert engine.residency.switches > RANDOM_SWITCHES // 2
    assert engine.residency.residents.evictions > 100, (
        "the arena was large enough that nothing was ever reloaded"
    )
    assert engine.residency.arena.stats().high_water == high_water <= engine.residency.arena.capacity
    assert sum(outside) == 0, f"the switch path allocated {sum(outside)} bytes outside the arena"
    assert len(finished) > 3 * len(names)
    for request_id, tokens in finished.items():
        assert tokens == expected[request_id], request_id


def step(engine: LLMEngine, generated: dict[str, list[int]]) -> list[str]:
    """One step: each request's new tokens appended to `generated`; the ids of those it finished."""
    finished = []
    for delta in engine.step():
        generated.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
        if delta.finished:
            finished.append(delta.request_id)
    return finished


def drain(engine: LLMEngine, generated: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Step the active model until its requests finish; their output tokens by request id."""
    generated = {} if generated is None else generated
    finished = []
    while engine.has_unfinished_requests(engine.active.name):
        finished += step(engine, generated)
    return {request_id: generated[request_id] for request_id in finished}


def run_alone(model_dirs, name: str, prompt: list[int]) -> list[int]:
    engine = LLMEngine(model_dirs[name], config=EngineConfig(kv_cache_bytes=KV_BYTES), progress=False)
    engine.add_request("alone", prompt, greedy())
    return drain(engine)["alone"]


def test_swapped_request_continues_exactly(model_dirs, prompts, kv_pool):
    engine = make_engine(model_dirs, kv_pool)
    prompt = prompts[1]
    alone = run_alone(model_dirs, "qwen3", prompt)

    engine.switch_to("qwen3")
    engine.add_request("moved", prompt, greedy(), model="qwen3")
    generated: dict[str, list[int]] = {}
    for _ in range(OUTPUT_TOKENS // 3):
        step(engine, generated)
    engine.swap_out("moved")
    assert kv_pool.stats().allocated_bytes > 0
    assert engine.models["qwen3"].batcher.allocator.num_free == engine.models["qwen3"].num_blocks

    # Other models run (and overwrite the device KV region) while "moved" waits in host memory.
    for other in ("llama", "mistral", "llama-wide"):
        engine.switch_to(other)
        engine.add_request(f"other-{other}", prompts[0], greedy(8), model=other)
        drain(engine)

    engine.switch_to("qwen3")
    engine.swap_in("moved")
    assert drain(engine, generated)["moved"] == alone
    assert kv_pool.stats().allocated_bytes == 0


def test_switch_to_a_resident_model_copies_nothing(model_dirs, kv_pool):
    engine = make_engine(model_dirs, kv_pool, resident_models=len(model_dirs) + 1)
    for name in model_dirs:
        engine.switch_to(name)
    loads = engine.residency.residents.loads
    for name in reversed(list(model_dirs)):
        assert engine.is_resident(name)
        engine.switch_to(name)
    assert engine.residency.residents.loads == loads
    assert engine.residency.residents.evictions == 0


def test_prefetch_makes_the_next_switch_free(model_dirs, prompts, references, kv_pool):
    engine = make_engine(model_dirs, kv_pool, resident_models=2.2)
    engine.switch_to("llama")
    assert engine.prefetch("qwen2")
    loads = engine.residency.residents.loads
    engine.switch_to("qwen2")
    assert engine.residency.residents.loads == loads
    engine.add_request("r", prompts[0], greedy(), model="qwen2")
    assert drain(engine)["r"] == references["qwen2"][0]


def test_switch_without_a_pool_recomputes_and_stays_exact(model_dirs, prompts, references):
    engine = make_engine(model_dirs, kv_pool=None)
    engine.switch_to("mistral")
    engine.add_request("m", prompts[0], greedy(), model="mistral")
    generated: dict[str, list[int]] = {}
    for _ in range(5):
        step(engine, generated)
    engine.switch_to("llama")  # no host pool: mistral's sequence is preempted, recomputed later
    engine.switch_to("mistral")
    assert drain(engine, generated)["m"] == references["mistral"][0]


def test_a_model_larger_than_the_arena_is_refused_clearly(model_dirs):
    memory = MemoryConfig(cpu_arena_bytes=KV_BYTES + 4096)
    with pytest.raises(ValueError, match="cpu_arena_bytes"):
        LLMEngine(
            models={"a": model_dirs["llama"], "b": model_dirs["qwen2"]},
            config=EngineConfig(kv_cache_bytes=KV_BYTES),
            memory=memory,
            progress=False,
        )
