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
