"""Fixtures of the HTTP tests: a module's models (`model_dirs`, defined by each module) served in process."""

from __future__ import annotations

import pytest

from aegaeon.config import MIB, EngineConfig
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.serve.engine_backend import EngineBackend

ENGINE_KV_BYTES = 4 * MIB


@pytest.fixture(scope="module")
def tokenizers(model_dirs) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_pretrained(path) for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def engine(model_dirs) -> LLMEngine:
    """One engine holding every model of the module (what `backend` serves)."""
    return LLMEngine(models=model_dirs, config=EngineConfig(kv_cache_bytes=ENGINE_KV_BYTES), progress=False)


@pytest.fixture(scope="module")
def backend(engine):
    """The engine's models behind the api server's backend protocol, in this process."""
    backend = EngineBackend(engine)
    yield backend
    backend.close()
