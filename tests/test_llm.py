"""The offline API as a user meets it: `from aegaeon import LLM, SamplingParams`."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import GenerationConfig

from aegaeon import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
TEXT = "The river runs from the mountains to the sea."


@pytest.fixture(scope="module")
def model_dir(demo_model_dirs):
    return demo_model_dirs["llama"]


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model=model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf(model_dir, hf_causal_lm):
    return hf_causal_lm(model_dir)


def hf_generate(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        return hf_model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    rng = random.Random(2)
    vocab = llm.engine.model().arch.vocab_size
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in (9, 1, 30, 4)]


def test_public_imports():
    import aegaeon
    from aegaeon.engine.sampling_params import SamplingParams as EngineSamplingParams
    from aegaeon.llm import LLM as EngineLLM

    assert LLM is EngineLLM and SamplingParams is EngineSamplingParams
    assert set(aegaeon.__all__) >= {"LLM", "SamplingParams"}
    with pytest.raises(AttributeError):
        aegaeon.NoSuchThing  # noqa: B018


def test_single_text_prompt(llm, hf):
    outputs = llm.generate(TEXT, GREEDY)
    assert len(outputs) == 1
    out = outputs[0]
    assert out.prompt == TEXT
    assert out.prompt_token_ids == llm.tokenizer.encode(TEXT)
    assert out.token_ids == hf_generate(hf, out.prompt_token_ids, 12)
    assert out.text == llm.tokenizer.decode(out.token_ids)
    assert out.finish_reason == "length" and out.finished


def test_single_token_prompt(llm, hf, prompts):
    outputs = llm.generate(prompts[0], GREEDY)  # a list of ints is one prompt, not many
    assert len(outputs) == 1
    assert outputs[0].prompt_token_ids == prompts[0]
    assert outputs[0].token_ids == hf_generate(hf, prompts[0], 12)


def test_default_params_sample_up_to_16_tokens(llm):
    out = llm.generate(TEXT)[0]
    assert 1 <= len(out.token_ids) <= 16
    assert out.finish_reason in ("stop", "length")


def test_list_of_prompts_in_input_order(llm, hf, prompts):
    mixed = [prompts[0], TEXT, prompts[1], prompts[2]]
    outputs = llm.generate(mixed, GREEDY)
    assert len(outputs) == 4
    assert [o.prompt for o in outputs] == [None, TEXT, None, None]
    assert outputs[1].prompt_token_ids == llm.tokenizer.encode(TEXT)
    for prompt, out in zip(mixed, outputs, strict=True):
        ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        assert out.prompt_token_ids == ids
        assert out.token_ids == hf_generate(hf, ids, 12)
    assert len({o.request_id for o in outputs}) == 4


def test_per_prompt_params_and_order_when_finishing_out_of_order(llm, hf, prompts):
    # The first prompt runs longest, so requests finish in reverse; outputs keep the input order.
    lengths = [20, 1, 9, 3]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    outputs = llm.generate(prompts, params)
    for prompt, n, out in zip(prompts, lengths, outputs, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == hf_generate(hf, prompt, n)
        assert out.finish_reason == "length"


def test_per_prompt_params_mix_greedy_and_stop(llm, prompts):
    full = llm.generate(prompts[3], GREEDY)[0]
    stop_id = full.token_ids[2]
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id])]
    plain, stopped = llm.generate([prompts[3], prompts[3]], params)
    assert plain.token_ids == full.token_ids
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]


@pytest.mark.parametrize("count", [0, 2, 4])
def test_mismatched_params_length(llm, prompts, count):
    with pytest.raises(ValueError, match=f"got {count} SamplingParams for 3 prompts"):
        llm.generate(prompts[:3], [GREEDY] * count)
    assert not llm.engine.has_unfinished_requests()
    assert len(llm.generate(prompts[:3], [GREEDY] * 3)) == 3


def test_chat_returns_the_reply(llm, hf):
    messages = [{"role": "user", "content": "hi"}]
    out = llm.chat(messages, GREEDY)
    expected_prompt = llm.tokenizer.apply_chat_template(messages)
    assert out.prompt_token_ids == expected_prompt
    assert llm.tokenizer.decode(expected_prompt, skip_special_tokens=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert out.token_ids == hf_generate(hf, expected_prompt, 12)
    assert isinstance(out.text, str) and out.text == llm.tokenizer.decode(out.token_ids)
    assert out.text  # twelve tokens of a random model are not all special


def test_chat_default_params(llm):
    out = llm.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert isinstance(out.text, str) and 1 <= len(out.token_ids) <= 16


@pytest.mark.parametrize("messages", [[], [{"role": "user"}], [{"role": "user", "content": 3}], "hi"])
def test_chat_rejects_malformed_messages(llm, messages):
    with pytest.raises(ValueError, match="messages"):
        llm.chat(messages)
    assert not llm.engine.has_unfinished_requests()
