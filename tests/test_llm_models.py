"""The offline API with several models: `LLM(models={...}).generate(prompts, params, model=...)`."""

from __future__ import annotations

import pytest

from aegaeon import LLM, SamplingParams
from aegaeon.config import MIB, EngineConfig, NodeConfig

TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(five_model_dirs, profile_path):
    models = {name: five_model_dirs[name] for name in ("llama", "qwen2", "mistral")}
    llm = LLM(
        models=models,
        config=EngineConfig(kv_cache_bytes=4 * MIB),
        node_config=NodeConfig(profile_path=str(profile_path)),
    )
    yield llm
    llm.close()


def test_one_model_for_all_prompts(llm, five_model_dirs, hf_greedy):
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5, 4]]
    outputs = llm.generate(prompts, GREEDY, model="qwen2")
    assert [o.token_ids for o in outputs] == [hf_greedy(five_model_dirs["qwen2"], p, TOKENS) for p in prompts]


def test_a_model_per_prompt_and_text_prompts(llm, five_model_dirs, hf_greedy):
    names = ["llama", "mistral", "qwen2", "llama"]
    texts = ["The market", "A lighthouse", "Bread and honey", "The harbor at night"]
    outputs = llm.generate(texts, GREEDY, model=names)
    for output, name, text in zip(outputs, names, texts, strict=True):
        prompt = llm.tokenizer_of(name).encode(text)
        assert output.prompt_token_ids == prompt
        assert output.token_ids == hf_greedy(five_model_dirs[name], prompt, TOKENS)
        assert output.text == llm.tokenizer_of(name).decode(output.token_ids)


def test_chat_with_a_named_model(llm, five_model_dirs, hf_greedy):
    out = llm.chat([{"role": "user", "content": "hi"}], GREEDY, model="mistral")
    prompt = llm.tokenizer_of("mistral").apply_chat_template([{"role": "user", "content": "hi"}])
    assert out.token_ids == hf_greedy(five_model_dirs["mistral"], prompt, TOKENS)


def test_bad_input_names_the_problem_and_queues_nothing(llm):
    with pytest.raises(KeyError, match="not served"):
        llm.generate([[1, 2]], GREEDY, model="gpt-5")
    with pytest.raises(ValueError, match="2 models for 1 prompts"):
        llm.generate([[1, 2]], GREEDY, model=["llama", "qwen2"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2], [10**9]], GREEDY, model="llama")
    assert not llm.node.live
    assert len(llm.generate([[1, 2]], GREEDY, model="llama")) == 1


def test_exactly_one_of_model_and_models(five_model_dirs):
    with pytest.raises(ValueError, match="either model=PATH or models="):
        LLM()
    with pytest.raises(ValueError, match="either model=PATH or models="):
        LLM(model=five_model_dirs["llama"], models={"a": five_model_dirs["llama"]})
