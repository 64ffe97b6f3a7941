"""Small builders shared by the scheduler tests."""

from __future__ import annotations

from aegaeon.scheduler.models import ModelSpec
from aegaeon.scheduler.predictor import Predictor, Profile
from aegaeon.scheduler.request import SchedRequest


def profile(
    shape: str = "shape",
    prefill: tuple[float, float, float] = (0.01, 1e-4, 0.0),
    decode: tuple[float, float, float] = (0.01, 1e-5, 1e-3),
    switch_s: float = 0.5,
) -> Profile:
    return Profile(shape, "float32", "cpu", prefill, decode, switch_s)


def predictor(**profiles: Profile) -> Predictor:
    return Predictor(profiles)


def spec(name: str, kv_block_bytes: int = 1000, max_model_len: int = 4096) -> ModelSpec:
    return ModelSpec(name, f"shape-{name}", 10_000, kv_block_bytes, max_model_len)


def req(
    rid: str, model: str, arrival: float, prompt: int = 16, max_tokens: int = 256, generated: int = 0
) -> SchedRequest:
    request = SchedRequest(rid, model, arrival, prompt, max_tokens)
    request.generated = generated
    return request
