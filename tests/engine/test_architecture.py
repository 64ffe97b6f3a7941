"""Reading HF configs into an `Architecture`: each family's switches, old and new formats, refusals."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from aegaeon import LLM
from aegaeon.engine.architecture import (
    SUPPORTED_ARCHITECTURES,
    Architecture,
    RopeScaling,
    UnsupportedModelError,
)

SUPPORTED_NAMES = tuple(SUPPORTED_ARCHITECTURES)  # LlamaForCausalLM, MistralForCausalLM, ...


@pytest.fixture(scope="module")
def hf_configs(demo_model_dirs) -> dict[str, dict]:
    """Each demo model's config.json as written by transformers 5."""
    return {arch: json.loads((path / "config.json").read_text()) for arch, path in demo_model_dirs.items()}


def parse(config: dict, generation: dict | None = None) -> Architecture:
    return Architecture.from_hf_config(copy.deepcopy(config), generation)


# ---------------------------------------------------------------------------- each family


def test_llama_has_llama3_rope(demo_model_dirs):
    arch = Architecture.from_pretrained(demo_model_dirs["llama"])
    assert arch.family == "llama"
    assert arch.rope == RopeScaling(
        theta=500000.0,
        kind="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position=64,
    )
    assert not arch.tie_embeddings and not arch.qkv_bias and not arch.qk_norm
    assert arch.sliding_window is None
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (4, 2, 16)
    assert arch.eos_token_ids == (0,)


def test_mistral_has_sliding_window(demo_model_dirs):
    arch = Architecture.from_pretrained(demo_model_dirs["mistral"])
    assert arch.family == "mistral"
    assert arch.sliding_window == 16
    assert arch.rope == RopeScaling(theta=10000.0)
    assert not arch.tie_embeddings and not arch.qkv_bias


def test_qwen2_has_qkv_bias_and_tied_embeddings(demo_model_dirs):
    arch = Architecture.from_pretrained(demo_model_dirs["qwen2"])
    assert arch.family == "qwen2"
    assert arch.qkv_bias and not arch.o_bias
    assert arch.tie_embeddings
    assert arch.sliding_window is None
    assert arch.rope == RopeScaling(theta=1000000.0)


def test_qwen3_has_qk_norm_and_own_head_dim(demo_model_dirs):
    arch = Architecture.from_pretrained(demo_model_dirs["qwen3"])
    assert arch.family == "qwen3"
    assert arch.qk_norm and not arch.qkv_bias
    assert arch.head_dim == 24 != arch.hidden_size // arch.num_heads
    assert (arch.q_size, arch.kv_size) == (4 * 24, 2 * 24)
    assert not arch.tie_embeddings


def test_qwen_sliding_window_ignored_unless_enabled(hf_configs):
    """Real Qwen2 configs carry a sliding_window that is off (use_sliding_window false): full attention."""
    config = dict(hf_configs["qwen2"], sliding_window=131072, use_sliding_window=False)
    assert parse(config).sliding_window is None
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        parse(dict(config, use_sliding_window=True))


def test_attention_bias_flag_gives_llama_biases(hf_configs):
    arch = parse(dict(hf_configs["llama"], attention_bias=True))
    assert arch.qkv_bias and arch.o_bias


def test_head_dim_defaults_to_hidden_over_heads(hf_configs):
    config = dict(hf_configs["llama"])
    del config["head_dim"]
    assert parse(config).head_dim == config["hidden_size"] // config["num_attention_heads"]


def test_eos_ids_prefer_generation_config(hf_configs):
    assert parse(hf_configs["llama"], {"eos_token_id": [0, 2]}).eos_token_ids == (0, 2)
    assert parse(hf_configs["llama"], {}).eos_token_ids == (0,)  # falls back to config.json


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Architecture.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- refusals


def assert_names_all_supported(message: str) -> None:
    for name in SUPPORTED_NAMES:
        assert name in message, f"{name} missing from {message!r}"


def test_unsupported_architecture(hf_configs):
    config = dict(hf_configs["llama"], architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel") as error:
        parse(config)
    assert_names_all_supported(str(error.value))


def test_mixture_of_experts_refused(hf_configs):
    config = dict(hf_configs["mistral"], num_local_experts=8, num_experts_per_tok=2)
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts") as error:
        parse(config)
    assert "num_local_experts" in str(error.value)


def test_unknown_rope_type(hf_configs):
    config = dict(hf_configs["llama"])
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModelError, match="'yarn'") as error:
        parse(config)
    for kind in ("default", "linear", "llama3"):
        assert kind in str(error.value)


def test_non_silu_activation(hf_configs):
    with pytest.raises(UnsupportedModelError, match="'gelu'.*supported: silu"):
        parse(dict(hf_configs["qwen3"], hidden_act="gelu"))


def test_quantized_checkpoint_refused(hf_configs):
    config = dict(hf_configs["llama"], quantization_config={"quant_method": "awq", "bits": 4})
    with pytest.raises(UnsupportedModelError, match="quantized.*float32, bfloat16 or float16"):
        parse(config)


def test_partial_rotary_refused(hf_configs):
    config = dict(hf_configs["llama"])
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        parse(config)


def test_unsupported_model_error_is_a_value_error():
    assert issubclass(UnsupportedModelError, ValueError)


def test_llm_refuses_unsupported_checkpoint(demo_model_dirs, tmp_path):
    """The refusal reaches the user at load time, before any weight is read."""
    model_dir = tmp_path / "gpt2"
    shutil.copytree(demo_model_dirs["llama"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(model_dir)


# ---------------------------------------------------------------------------- transformers 4 format


def old_style(config: dict, rope_scaling: dict | None) -> dict:
    """The same config as transformers 4 wrote it: top-level rope_theta, optional rope_scaling."""
    config = copy.deepcopy(config)
    params = config.pop("rope_parameters")
    config["rope_theta"] = params["rope_theta"]
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def test_old_style_llama3_rope_parses_the_same(hf_configs):
    new = hf_configs["llama"]
    scaling = {k: v for k, v in new["rope_parameters"].items() if k != "rope_theta"}
    assert scaling["rope_type"] == "llama3"
    assert parse(old_style(new, scaling)) == parse(new)


def test_old_style_default_rope_parses_the_same(hf_configs):
    for arch in ("mistral", "qwen2", "qwen3"):
        new = hf_configs[arch]
        assert parse(old_style(new, None)) == parse(new)
        assert parse(old_style(new, None)).rope.theta == new["rope_parameters"]["rope_theta"]


def test_old_style_linear_rope_with_type_key(hf_configs):
    """Older checkpoints name the kind `type`, not `rope_type`."""
    new = copy.deepcopy(hf_configs["mistral"])
    new["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    old = old_style(new, {"type": "linear", "factor": 2.0})
    assert parse(old) == parse(new)
    assert parse(old).rope == RopeScaling(theta=10000.0, kind="linear", factor=2.0)


def test_old_style_unknown_rope_type_refused(hf_configs):
    old = old_style(hf_configs["llama"], {"type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="'dynamic'"):
        parse(old)
