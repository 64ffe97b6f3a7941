"""Tensor parallelism on the CPU: two rank processes (gloo) give the tokens of one process.

A user sees: a model served with `tensor_parallel_size=2` answers exactly as with one process and as
transformers does (greedy), on every supported architecture, a GQA model with fewer KV heads than
ranks and a model with tied embeddings included; and an engine switching between two such models
token by token keeps every request's output exact. Each rank holds half of every split tensor.
"""

from __future__ import annotations

import os

import psutil
import pytest
import torch

from aegaeon.config import MIB, EngineConfig, MemoryConfig
from aegaeon.engine.architecture import Architecture
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.parallel.lockstep import TensorParallelEngine
from aegaeon.engine.parallel.shards import Shard, check_divisible, cut, shard_shapes, tensor_cuts
from aegaeon.engine.residency import weight_bytes
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.weights import canonical_shapes

# Four families, a GQA model with one KV head (fewer than the ranks); qwen2 ties its embeddings.
MODELS = {
    "llama": dict(arch="llama"),
    "mistral": dict(arch="mistral"),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    "llama-1kv": dict(arch="llama", num_kv_heads=1, seed=7),
}
PROMPTS = [[5, 17, 42, 99, 3], [7, 300, 12, 8, 150, 61, 2, 44]]
OUTPUT_TOKENS = 8
LOGITS_TOLERANCE = 1e-4
KV_BYTES = 4 * MIB
GREEDY = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dirs(make_demo_model):
    return {name: make_demo_model(**kwargs) for name, kwargs in MODELS.items()}


@pytest.fixture(scope="module")
def tp_engine(model_dirs):
    engine = TensorParallelEngine(
        models=model_dirs,
        tensor_parallel_size=2,
        config=EngineConfig(kv_cache_bytes=KV_BYTES),
        memory=MemoryConfig(host_model_cache_bytes=64 * MIB),
        progress=False,
        cpu_threads=1,
    )
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def single_engine(model_dirs):
    return LLMEngine(models=model_dirs, config=EngineConfig(kv_cache_bytes=KV_BYTES), progress=False)


def generate(engine: LLMEngine, model: str, prompts: list[list[int]]) -> list[list[int]]:
    engine.switch_to(model)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"{model}-{index}", prompt, GREEDY, model)
    tokens = {f"{model}-{index}": [] for index in range(len(prompts))}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id].extend(output.outputs[0].token_ids)
    return list(tokens.values())


@pytest.mark.parametrize("model", list(MODELS))
def test_tp2_greedy_equals_one_process_and_transformers(
    model, model_dirs, tp_engine, single_engine, hf_greedy
):
    expected = [hf_greedy(model_dirs[model], prompt, OUTPUT_TOKENS) for prompt in PROMPTS]
    assert generate(single_engine, model, PROMPTS) == expected
    assert generate(tp_engine, model, PROMPTS) == expected


@pytest.mark.parametrize("model", list(MODELS))
def test_tp2_first_step_logits_match_one_process(model, tp_engine, single_engine):
    ours = tp_engine.next_token_logits(PROMPTS, model)
    reference = single_engine.next_token_logits(PROMPTS, model)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=LOGITS_TOLERANCE, rtol=0)


def test_two_tp2_models_switched_token_by_token_stay_exact(model_dirs, tp_engine, hf_greedy):
    """Each step runs the other model: its KV is taken off the device and recomputed on return."""
    models = ("llama", "qwen3")
    tokens = {}
    for model in models:
        for index, prompt in enumerate(PROMPTS):
            tp_engine.add_request(f"switch-{model}-{index}", prompt, GREEDY, model)
            tokens[f"switch-{model}-{index}"] = []
    turn = 0
    while tp_engine.has_unfinished_requests():
        model = models[turn % 2]
        turn += 1
        if not tp_engine.has_unfinished_requests(model):
            continue
        tp_engine.switch_to(model)
        for output in tp_engine.step():
            tokens[output.request_id].extend(output.outputs[0].token_ids)
    assert tp_engine.residency.switches > 2 * OUTPUT_TOKENS
    for model in models:
        for index, prompt in enumerate(PROMPTS):
            assert tokens[f"switch-{model}-{index}"] == hf_greedy(model_dirs[model], prompt, OUTPUT_TOKENS)


def test_each_rank_holds_half_of_the_split_weights(model_dirs):
    """The shards put back together are the model; split tensors and their bytes are halved."""
    arch = Architecture.from_pretrained(model_dirs["llama-1kv"])
    whole = {name: torch.randn(shape) for name, shape in canonical_shapes(arch).items()}
    shards = [Shard(rank, 2) for rank in range(2)]
    for shard in shards:
        for name, how in tensor_cuts(arch, shard).items():
            assert tuple(cut(whole[name], how).shape) == shard_shapes(arch, shard)[name]
    # One KV head, two ranks: both hold it (replicated); the query heads are split.
    qkv = [cut(whole["layers.0.qkv"], tensor_cuts(arch, shard)["layers.0.qkv"]) for shard in shards]
    q_rows = arch.q_size // 2
    torch.testing.assert_close(qkv[0][q_rows:], qkv[1][q_rows:])
    queries = torch.cat([qkv[0][:q_rows], qkv[1][:q_rows]])
    torch.testing.assert_close(queries, whole["layers.0.qkv"][: arch.q_size])
    # Columns of o and down, rows of gate_up and the vocabulary: concatenated back, the whole.
    o = [cut(whole["layers.0.o"], tensor_cuts(arch, shard)["layers.0.o"]) for shard in shards]
    torch.testing.assert_close(torch.cat(o, dim=1), whole["layers.0.o"])
    embed = [cut(whole["embed"], tensor_cuts(arch, shard)["embed"]) for shard in shards]
    torch.testing.assert_close(torch.cat(embed), whole["embed"])
    full = weight_bytes(arch, torch.float32)
    per_rank = [weight_bytes(arch, torch.float32, shard) for shard in shards]
    assert all(nbytes < 0.6 * full for nbytes in per_rank)


def test_a_model_whose_heads_do_not_split_is_refused(model_dirs):
    arch = Architecture.from_pretrained(model_dirs["llama"])
    with pytest.raises(ValueError, match="does not divide this model's 4 attention heads"):
        check_divisible(arch, 3)


def test_offline_llm_with_tensor_parallel_size_two(model_dirs, hf_greedy):
    from aegaeon import LLM

    llm = LLM(model=model_dirs["qwen2"], tensor_parallel_size=2)
    try:
        outputs = llm.generate(PROMPTS, GREEDY)
    finally:
        llm.close()
    assert [output.outputs[0].token_ids for output in outputs] == [
        hf_greedy(model_dirs["qwen2"], prompt, OUTPUT_TOKENS) for prompt in PROMPTS
    ]


def test_an_engine_whose_model_does_not_split_fails_to_start_and_leaves_no_rank(model_dirs):
    before = {child.pid for child in psutil.Process().children()}
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide"):
        TensorParallelEngine(model_dirs["llama"], tensor_parallel_size=3, progress=False)
    assert {child.pid for child in psutil.Process().children()} <= before


def test_tp2_requests_swapped_through_the_host_pool_stay_exact(model_dirs, hf_greedy):
    """Each rank copies its part of every KV block to the shared pool and back; rank 0 chose them."""
    from aegaeon.memory.kv_pool import HostKVPool

    pool = HostKVPool.create(MemoryConfig().shm_dir, f"aegaeon-test-tp-kv-{os.getpid()}", 16 * MIB, MIB)
    engine = TensorParallelEngine(
        models={"llama": model_dirs["llama"], "qwen3": model_dirs["qwen3"]},
        tensor_parallel_size=2,
        config=EngineConfig(kv_cache_bytes=KV_BYTES),
        kv_pool=pool,
        progress=False,
    )
    try:
        engine.switch_to("llama")
        for index, prompt in enumerate(PROMPTS):
            engine.add_request(f"s{index}", prompt, GREEDY, "llama")
        tokens = {f"s{index}": [] for index in range(len(PROMPTS))}
        steps = 0
        while engine.has_unfinished_requests():
            steps += 1
            if steps % 3 == 0:  # every third step: both requests out to the pool and back in
                for request_id in engine.requests_of("llama"):
                    engine.swap_out(request_id)
                assert pool.stats().allocated_bytes > 0
                for request_id in engine.requests_of("llama"):
                    engine.swap_in(request_id)
            for output in engine.step():
                tokens[output.request_id].extend(output.outputs[0].token_ids)
        assert list(tokens.values()) == [
            hf_greedy(model_dirs["llama"], prompt, OUTPUT_TOKENS) for prompt in PROMPTS
        ]
    finally:
        engine.close()
    assert pool.stats().allocated_bytes == 0  # every host block was given back
    pool.close()
