"""Shared pytest fixtures: tiny random-weight demo models written once per test session."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest

from aegaeon.demo import DEMO_ARCHITECTURES, write_demo_model


@pytest.fixture(scope="session")
def make_demo_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., pathlib.Path]:
    """Return a factory `make_demo_model(arch, **kwargs) -> Path` that caches models by arguments."""
    cache: dict[tuple, pathlib.Path] = {}
    root = tmp_path_factory.mktemp("demo-models")

    def make(arch: str = "llama", **kwargs) -> pathlib.Path:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = write_demo_model(root / f"{arch}-{len(cache)}", arch, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def demo_model_dirs(make_demo_model: Callable[..., pathlib.Path]) -> dict[str, pathlib.Path]:
    """Map each demo architecture to the directory of its default float32 model."""
    return {arch: make_demo_model(arch) for arch in DEMO_ARCHITECTURES}


@pytest.fixture(scope="session")
def hf_causal_lm() -> Callable[..., object]:
    """Return a factory `hf_causal_lm(path, dtype=torch.float32)` of HF reference models, cached by arguments.

    Their generation config has no eos: `generate` fills a field left None in the GenerationConfig
    it is passed from the model's own, so `eos_token_id=None` alone would still stop at the demo
    tokenizer's eos (id 0) where our side, with `ignore_eos=True`, goes on.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cache: dict[tuple, object] = {}

    def load(path: pathlib.Path, dtype: torch.dtype = torch.float32):
        key = (str(path), dtype)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            model.generation_config.eos_token_id = None
            cache[key] = model
        return cache[key]

    return load


# Five shapes: four families plus a wider Llama, so block shapes and weight sizes all differ.
FIVE_MODELS = {
    "llama": dict(arch="llama"),
    "mistral": dict(arch="mistral", num_layers=3),
    "qwen2": dict(arch="qwen2", hidden_size=96, num_heads=6, num_kv_heads=3),
    "qwen3": dict(arch="qwen3"),
    "llama-wide": dict(arch="llama", hidden_size=128, intermediate_size=256, num_kv_heads=4, seed=5),
}


@pytest.fixture(scope="session")
def five_model_dirs(make_demo_model) -> dict[str, pathlib.Path]:
    """Five tiny models of different shapes, by name."""
    return {name: make_demo_model(**kwargs) for name, kwargs in FIVE_MODELS.items()}


@pytest.fixture(scope="session")
def hf_greedy(hf_causal_lm) -> Callable[[pathlib.Path, list[int], int], list[int]]:
    """Return `hf_greedy(path, prompt_ids, max_new_tokens)`: transformers' greedy continuation, cached."""
    import torch
    from transformers import GenerationConfig

    cache: dict[tuple, list[int]] = {}

    def generate(path: pathlib.Path, prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (str(path), tuple(prompt), max_new_tokens)
        if key not in cache:
            config = GenerationConfig(
                do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0
            )
            with torch.no_grad():
                out = hf_causal_lm(path).generate(torch.tensor([prompt]), generation_config=config)
            cache[key] = out[0, len(prompt) :].tolist()
        return cache[key]

    return generate


@pytest.fixture(scope="session")
def profile_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One latency-profile file for the whole session: each model shape is profiled once."""
    return tmp_path_factory.mktemp("profiles") / "profiles.json"
