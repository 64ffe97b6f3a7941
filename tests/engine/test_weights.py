"""Loading checkpoints: sharded or single-file, dtype conversion, and the errors a user can hit."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from aegaeon import LLM, SamplingParams
from aegaeon.demo import DEMO_ARCHITECTURES
from aegaeon.engine.weights import SAFETENSORS_INDEX

SHARD_BYTES = 100_000
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
FLOAT32_LOGIT_TOLERANCE = 1e-4


def prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in (2, 17, 33)]


@pytest.mark.parametrize("arch", DEMO_ARCHITECTURES)
def test_sharded_checkpoint_equals_single_file(arch, demo_model_dirs, make_demo_model):
    single_dir = demo_model_dirs[arch]
    sharded_dir = make_demo_model(arch, max_shard_bytes=SHARD_BYTES)
    index = json.loads((sharded_dir / SAFETENSORS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1, "the checkpoint was meant to be sharded"
    assert not (sharded_dir / "model.safetensors").exists()

    single, sharded = LLM(single_dir), LLM(sharded_dir)
    batch = prompts(single.engine.model().arch.vocab_size)
    assert torch.equal(single.engine.next_token_logits(batch), sharded.engine.next_token_logits(batch))
    expected = [out.token_ids for out in single.generate(batch, GREEDY)]
    assert [out.token_ids for out in sharded.generate(batch, GREEDY)] == expected


def test_bfloat16_checkpoint_runs_in_float32(make_demo_model, hf_causal_lm):
    """Weights stored in bfloat16 are widened at load; float32 math then matches HF's float32."""
    model_dir = make_demo_model("qwen3", dtype="bfloat16")
    llm = LLM(model_dir, dtype="float32")
    assert llm.engine.model().runner.kv_cache.dtype == torch.float32
    batch = prompts(llm.engine.model().arch.vocab_size)
    hf = hf_causal_lm(model_dir, torch.float32)
    with torch.no_grad():
        reference = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in batch])
    diff = (llm.engine.next_token_logits(batch) - reference).abs().max().item()
    assert diff <= FLOAT32_LOGIT_TOLERANCE


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", torch.bfloat16])
def test_supported_dtypes_load(demo_model_dirs, dtype):
    llm = LLM(demo_model_dirs["llama"], dtype=dtype)
    expected = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    assert llm.engine.dtype == expected
    assert llm.engine.model().runner.kv_cache.dtype == expected
    out = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def test_missing_model_dir(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LLM(missing)


def test_dir_without_weights(demo_model_dirs, tmp_path):
    model_dir = tmp_path / "no-weights"
    shutil.copytree(demo_model_dirs["llama"], model_dir)
    for file in model_dir.glob("*.safetensors"):
        file.unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors weights in .*no-weights"):
        LLM(model_dir)


def test_dir_without_config(demo_model_dirs, tmp_path):
    model_dir = tmp_path / "no-config"
    shutil.copytree(demo_model_dirs["llama"], model_dir)
    (model_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(model_dir)


def test_checkpoint_missing_a_tensor(demo_model_dirs, tmp_path):
    model_dir = tmp_path / "truncated"
    shutil.copytree(demo_model_dirs["qwen2"], model_dir)
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.bias"):
        LLM(model_dir)


@pytest.mark.parametrize("dtype", ["float64", "fp16", "int8", torch.float64])
def test_unsupported_dtype_lists_supported(demo_model_dirs, dtype):
    with pytest.raises(ValueError, match="unsupported dtype") as error:
        LLM(demo_model_dirs["llama"], dtype=dtype)
    for name in ("float32", "bfloat16", "float16"):
        assert name in str(error.value)
