"""The shape of a decoder-only transformer, read from an HF `config.json` and checked.

One `Architecture` describes every model family the engine runs (Llama, Mistral, Qwen2, Qwen3):
they differ only in a handful of switches (qkv bias, q/k norm, tied embeddings, sliding window,
rope scaling). Anything else is refused here, at load time, with a message naming what we support.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)
# Config keys whose presence means a mixture-of-experts model, which this engine does not run.
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_RMS_NORM_EPS = 1e-6


class UnsupportedModelError(ValueError):
    """The checkpoint uses an architecture or option this engine does not implement."""


@dataclass(frozen=True)
class RopeScaling:
    """Rotary embedding parameters; `kind` is one of SUPPORTED_ROPE_TYPES."""

    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class Architecture:
    """Everything the engine needs to know about a model's shape."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeScaling
    max_position: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def shape_key(self) -> str:
        """A string naming this shape, for keying profiles and KV block shapes."""
        return (
            f"{self.family}-h{self.hidden_size}-l{self.num_layers}-q{self.num_heads}"
            f"-kv{self.num_kv_heads}-d{self.head_dim}-i{self.intermediate_size}-v{self.vocab_size}"
        )

    def num_parameters(self) -> int:
        """Parameter count, counting tied embeddings once."""
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.num_layers * (attn + mlp) + embeddings

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Architecture:
        """Read `config.json` (and `generation_config.json` for eos ids) from a model directory."""
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}: is this an HF model directory?")
        config = json.loads(config_path.read_text())
        generation_path = model_dir / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
        return cls.from_hf_config(config, generation)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], generation: dict[str, Any] | None = None) -> Architecture:
        """Build from the dicts of `config.json` and `generation_config.json`; refuse what we lack."""
        architectures = config.get("architectures") or []
        family = _family(architectures, config.get("model_type"))
        _refuse_unsupported_options(config, family)

        hidden = config["hidden_size"]
        num_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or hidden // num_heads
        sliding_window = config.get("sliding_window") if family == "mistral" else None

        eos = _token_ids((generation or {}).get("eos_token_id")) or _token_ids(config.get("eos_token_id"))
        return cls(
            family=family,
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            intermediate_size=config["intermediate_size"],
            rms_norm_eps=config.get("rms_norm_eps", DEFAULT_RMS_NORM_EPS),
            rope=_rope(config),
            max_position=config.get("max_position_embeddings", 2048),
            qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
            o_bias=family in ("llama", "qwen3") and bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            sliding_window=sliding_window,
            eos_token_ids=eos,
            bos_token_id=config.get("bos_token_id"),
        )


def _family(architectures: list[str], model_type: str | None) -> str:
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    if not architectures and model_type in SUPPORTED_ARCHITECTURES.values():
        return model_type
    raise UnsupportedModelError(
        f"unsupported architecture {architectures or model_type!r}; "
        f"aegaeon runs {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _refuse_unsupported_options(config: dict[str, Any], family: str) -> None:
    moe = [key for key in MOE_KEYS if config.get(key)]
    if moe:
        raise UnsupportedModelError(f"mixture-of-experts models are not supported (config has {moe[0]})")
    activation = config.get("hidden_act", "silu")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(
            f"unsupported activation {activation!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    if config.get("quantization_config"):
        raise UnsupportedModelError(
            "quantized checkpoints are not supported; use float32, bfloat16 or float16"
        )
    if family in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        raise UnsupportedModelError(
            f"{family} with use_sliding_window is not supported; only Mistral's sliding window is"
        )
    layer_types = config.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types) and family != "mistral":
        raise UnsupportedModelError(f"per-layer attention types {sorted(set(layer_types))} are not supported")


def _rope(config: dict[str, Any]) -> RopeScaling:
    # transformers 5 writes `rope_parameters` (theta inside); older checkpoints `rope_theta` + `rope_scaling`.
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings are not supported")
    if kind == "default":
        return RopeScaling(theta=theta)
    if kind == "linear":
        return RopeScaling(theta=theta, kind=kind, factor=params["factor"])
    return RopeScaling(
        theta=theta,
        kind=kind,
        factor=params["factor"],
        low_freq_factor=params["low_freq_factor"],
        high_freq_factor=params["high_freq_factor"],
        original_max_position=params["original_max_position_embeddings"],
    )


def _token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(value)
