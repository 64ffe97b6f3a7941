"""Tests for the demo model and tokenizer builders."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from aegaeon.demo import (
    DEMO_ARCHITECTURES,
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    build_tokenizer,
    write_demo_model,
    write_demo_models,
)

MULTIBYTE_TEXT = "café naïve 日本語 🙂 — Ωμέγα\n\ttabs  and  spaces "
SHARD_BYTES = 100_000


@pytest.mark.parametrize("arch", DEMO_ARCHITECTURES)
def test_model_loads_and_runs(demo_model_dirs, arch):
    path = demo_model_dirs[arch]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tokenizer)
    ids = torch.tensor([tokenizer.encode("The old lighthouse stood at the edge of the harbor.")])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert logits.std() > 1.0
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id


def test_distinctive_config_features(demo_model_dirs):
    llama = AutoConfig.from_pretrained(demo_model_dirs["llama"])
    rope = getattr(llama, "rope_parameters", None) or llama.rope_scaling
    assert rope["rope_type"] == "llama3"
    assert rope["factor"] == 8.0
    assert not llama.tie_word_embeddings

    mistral = AutoConfig.from_pretrained(demo_model_dirs["mistral"])
    assert mistral.sliding_window == 16

    qwen2 = AutoConfig.from_pretrained(demo_model_dirs["qwen2"])
    assert qwen2.tie_word_embeddings
    qwen2_model = AutoModelForCausalLM.from_pretrained(demo_model_dirs["qwen2"])
    q_bias = qwen2_model.model.layers[0].self_attn.q_proj.bias
    assert q_bias is not None and q_bias.abs().sum() > 0

    qwen3 = AutoConfig.from_pretrained(demo_model_dirs["qwen3"])
    assert qwen3.head_dim != qwen3.hidden_size // qwen3.num_attention_heads
    assert not qwen3.tie_word_embeddings


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype(make_demo_model, dtype):
    path = make_demo_model("qwen3", dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    assert model.dtype == getattr(torch, dtype)
    with torch.no_grad():
        logits = model(torch.arange(20)[None]).logits
    assert torch.isfinite(logits).all()


def test_sharded_checkpoint(make_demo_model):
    path = make_demo_model("llama", max_shard_bytes=SHARD_BYTES)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert all((path / shard).exists() for shard in shards)
    AutoModelForCausalLM.from_pretrained(path)


def test_same_seed_same_weights(tmp_path):
    first = write_demo_model(tmp_path / "a", "mistral", seed=3)
    second = write_demo_model(tmp_path / "b", "mistral", seed=3)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_write_demo_models(tmp_path):
    paths = write_demo_models(tmp_path, count=5)
    names = [path.name for path in paths]
    assert len(set(names)) == 5
    assert names[:4] == [f"demo-{arch}" for arch in DEMO_ARCHITECTURES]
    assert all((path / "config.json").exists() for path in paths)


def test_tokenizer_round_trips_multibyte_text():
    tokenizer = build_tokenizer()
    assert 800 <= len(tokenizer) <= 1100
    ids = tokenizer.encode(MULTIBYTE_TEXT)
    assert tokenizer.decode(ids) == MULTIBYTE_TEXT
    assert len(tokenizer.encode("🙂")) > 1
    assert len(tokenizer.encode("日")) > 1


def test_tokenizer_special_tokens():
    tokenizer = build_tokenizer()
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.bos_token is None
    for token in (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN):
        assert len(tokenizer.encode(token)) == 1
    assert build_tokenizer() is not tokenizer


def test_chat_template_renders_chatml(demo_model_dirs):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
    )
    for tokenizer in (build_tokenizer(), AutoTokenizer.from_pretrained(demo_model_dirs["qwen2"])):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        assert rendered == expected
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == expected + "<|im_start|>assistant\n"
