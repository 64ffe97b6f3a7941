"""The CPU kernels in C (paged decode attention, rotary, add + RMS norm, SiLU * up): against their
torch definitions, in the engine, and the engine's fallback where they cannot be built."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aegaeon import LLM, SamplingParams
from aegaeon.engine import cpu_kernels
from aegaeon.engine.architecture import Architecture
from aegaeon.engine.cpu_kernels import add_rms_norm, paged_decode_attention, rotate, silu_mul
from aegaeon.engine.paged_decode import paged_decode_attention_reference
from aegaeon.engine.rope import RotaryTable, apply_rotary
from aegaeon.engine.weights import DTYPES
from tests.engine.test_paged_decode import (
    DTYPE_NAMES,
    LAYER,
    TOLERANCES,
    check_kernel_against_reference,
    make_case,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# 64 and 128 run specialised code; 24 and 40 the general vector path (multiples of 8 that fill part
# of a 64-float chunk); 20 the plain loops.
CPU_HEAD_DIMS = (20, 24, 40, 64, 128, 256)
# Multiples of 32 take the AVX-512 path where the kernels are built for it: 64 and 128 specialised,
# 96 the general code (a last chunk of 32); 40 stays on the AVX2 path.
GROUPED_HEAD_DIMS = (40, 64, 96, 128)
GREEDY_TOKENS = 24
# The paged kernel splits a step over threads from this many (token, KV head) pairs on
# (MIN_PARALLEL_WORK in cpu_kernels.c).
MIN_PARALLEL_WORK = 4096
# 12 rows of 5-104 tokens, crossing block boundaries (the kernel's split over threads is checked
# on its own in test_kernel_result_does_not_depend_on_thread_count).
PROMPTS = [[3 + (7 * i + j) % 97 for j in range(5 + 9 * i)] for i in range(12)]


# The kernels' vector paths, by the target they are built for: this CPU's own (AVX-512 where it has
# it), AVX2 without AVX-512, and none (plain loops). An x86 CPU runs all three.
VECTOR_PATHS = {"native": "native", "avx2": "x86-64-v3", "plain": "x86-64"}


@pytest.fixture(scope="module", autouse=True)
def kernel_built():
    assert cpu_kernels.cpu_kernels_available(), "this machine has a C compiler: the kernels must build"


@pytest.fixture(params=list(VECTOR_PATHS))
def vector_path(request, monkeypatch):
    """The module's functions on the kernels built for one vector path."""
    if request.param != "native":
        if platform.machine() != "x86_64":
            pytest.skip("the other vector paths are x86 targets")
        library = cpu_kernels.build_for(VECTOR_PATHS[request.param])
        assert library is not None, f"the kernels must build for {VECTOR_PATHS[request.param]}"
        monkeypatch.setattr(cpu_kernels, "_library", lambda: library)
    return request.param


@pytest.mark.parametrize("dtype_name", list(DTYPE_NAMES))
def test_kernel_matches_reference(dtype_name, vector_path):
    failures = check_kernel_against_reference(
        paged_decode_attention, DTYPE_NAMES[dtype_name], "cpu", head_dims=CPU_HEAD_DIMS
    )
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
def test_kernel_matches_reference_for_grouped_heads(dtype_name, group, vector_path):
    """Every query head of a KV head against the reference, over contexts that end anywhere in a block
    and windows that start anywhere in one, with the slots past each context holding NaN (a cache's
    unwritten slots hold anything; on AVX-512 a block's 16 scores are computed as one vector)."""
    dtype = DTYPE_NAMES[dtype_name]
    generator = torch.Generator().manual_seed(group)
    context_lens = torch.tensor([1, 2, 15, 16, 17, 31, 33, 47, 64, 250, 513], dtype=torch.int32)
    rows, kv_heads, max_blocks = len(context_lens), 2, -(-int(context_lens.max()) // 16)
    for head_dim in GROUPED_HEAD_DIMS:
        # Each row's tokens laid out contiguously, NaN past its context, then scattered into blocks.
        tokens = torch.full((rows, max_blocks * 16, 2, kv_heads, head_dim), float("nan"))
        for row, ctx in enumerate(context_lens.tolist()):
            tokens[row, :ctx] = torch.randn(ctx, 2, kv_heads, head_dim, generator=generator) * 2
        block_tables = torch.randperm(rows * max_blocks, generator=generator).reshape(rows, max_blocks)
        kv_cache = torch.zeros(rows * max_blocks, LAYER + 1, 2, 16, kv_heads, head_dim)
        kv_cache[block_tables.flatten(), LAYER] = tokens.view(-1, 16, 2, kv_heads, head_dim).transpose(1, 2)
        kv_cache, block_tables = kv_cache.to(dtype), block_tables.to(torch.int32)
        q = (torch.randn(rows, group * kv_heads, head_dim, generator=generator) * 2).to(dtype)
        scale = head_dim**-0.5
        inputs = (q, kv_cache, LAYER, block_tables, context_lens, scale)
        for window in (None, 20, 37):
            out = paged_decode_attention(*inputs, window)
            ref = paged_decode_attention_reference(*inputs, window)
            tolerance = TOLERANCES[dtype]
            torch.testing.assert_close(out.float(), ref.float(), atol=tolerance, rtol=tolerance)


def _many_rows() -> tuple[torch.Tensor, ...]:
    """The test case's rows 16 times over: the kernel splits them over threads a row per task."""
    q, kv_cache, block_tables, context_lens = make_case(4, 64, torch.float32, "cpu")
    return kv_cache, q.repeat(16, 1, 1), block_tables.repeat(16, 1), context_lens.repeat(16)


def _few_long_rows() -> tuple[torch.Tensor, ...]:
    """Fewer rows than two per thread, with long contexts: a task per (row, kv head)."""
    gen = torch.Generator().manual_seed(0)
    rows, context, kv_heads, blocks = 3, 1000, 2, -(-1000 // 16)
    kv_cache = torch.randn(rows * blocks, LAYER + 1, 2, 16, kv_heads, 64, generator=gen)
    block_tables = torch.randperm(rows * blocks, generator=gen).reshape(rows, blocks).to(torch.int32)
    q = torch.randn(rows, 4 * kv_heads, 64, generator=gen)
    return kv_cache, q, block_tables, torch.full((rows,), context, dtype=torch.int32)


@pytest.mark.parametrize("case", [_many_rows, _few_long_rows])
def test_kernel_result_does_not_depend_on_thread_count(case):
    kv_cache, q, block_tables, context_lens = case()
    assert int(context_lens.sum()) * kv_cache.shape[4] >= MIN_PARALLEL_WORK  # enough to use threads
    previous = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outputs.append(paged_decode_attention(q, kv_cache, LAYER, block_tables, context_lens, 0.125))
    finally:
        torch.set_num_threads(previous)
    # Each (row, kv head) is summed in one fixed order, whichever thread and task shape runs it.
    assert torch.equal(outputs[0], outputs[1])


def test_kernel_refuses_what_it_cannot_hold():
    q, kv_cache, block_tables, context_lens = make_case(16, 64, torch.float32, "cpu")
    wide = q.repeat(1, 2, 1)  # 32 query heads per KV head: more than the kernel's scratch holds
    with pytest.raises(ValueError, match="does not support"):
        paged_decode_attention(wide, kv_cache, LAYER, block_tables, context_lens, 0.125)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, kv_cache, LAYER, block_tables.long(), context_lens, 0.125)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_engine_decodes_the_same_with_and_without_the_kernel(demo_model_dirs, arch):
    """The torch paths (used where no compiler exists) and the kernels give the same tokens and logprobs."""
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True, logprobs=2)
    llm = LLM(demo_model_dirs[arch])
    runner = llm.engine.model().runner
    kernels = runner.model.cpu_kernels
    assert kernels is not None and runner.paged_decode == kernels.paged_decode
    with_kernel = llm.generate(PROMPTS, params)
    runner.paged_decode, runner.model.cpu_kernels = None, None
    gathered = llm.generate(PROMPTS, params)
    for ours, theirs in zip(with_kernel, gathered, strict=True):
        assert ours.token_ids == theirs.token_ids
        for a, b in zip(ours.logprobs, theirs.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) <= 1e-5


def hf_style_add_rms_norm(residual, x, weight, eps):
    """transformers' LlamaRMSNorm after `residual + x`, on copies."""
    residual = residual + x
    hidden = residual.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return residual, weight * hidden.to(residual.dtype)


@pytest.mark.parametrize("dtype_name", list(DTYPE_NAMES))
@pytest.mark.parametrize("rows", [1, 16, 200])
def test_add_rms_norm_matches_transformers(dtype_name, rows, vector_path):
    dtype = DTYPE_NAMES[dtype_name]
    generator = torch.Generator().manual_seed(rows)
    residual, x = (torch.randn(rows, 768, generator=generator).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(768, generator=generator)).to(dtype)
    expected_residual, expected = hf_style_add_rms_norm(residual, x, weight, 1e-6)
    out = add_rms_norm(residual, x, weight, 1e-6)
    # The residual sum is one rounding either way; the norm's mean sums in another order.
    assert torch.equal(residual, expected_residual)
    tolerance = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)
    only_norm = add_rms_norm(residual.clone(), None, weight, 1e-6)  # x None: no add
    expected_norm = hf_style_add_rms_norm(residual, torch.zeros_like(x), weight, 1e-6)[1]
    torch.testing.assert_close(only_norm, expected_norm, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype_name", list(DTYPE_NAMES))
@pytest.mark.parametrize("rows", [1, 16, 200])
def test_silu_mul_matches_torch(dtype_name, rows, vector_path):
    dtype = DTYPE_NAMES[dtype_name]
    # Wide enough to cover both signs, saturation and the overflow of exp(-x) for very negative x.
    gate_up = (torch.randn(rows, 2 * 256, generator=torch.Generator().manual_seed(rows)) * 8).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(silu_mul(gate_up), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype_name", list(DTYPE_NAMES))
def test_silu_mul_and_norm_in_bfloat16_round_as_torch(dtype_name, vector_path):
    """Beyond the tolerance: the bfloat16 results are torch's own bits (their float32 arithmetic
    differs from torch's in the last bits at most, which the rounding to bfloat16 all but hides)."""
    dtype = DTYPE_NAMES[dtype_name]
    generator = torch.Generator().manual_seed(5)
    gate_up = (torch.randn(64, 2 * 2056, generator=generator) * 4).to(dtype)  # rows not a whole vector
    gate, up = gate_up.chunk(2, dim=-1)
    residual, x = (torch.randn(64, 776, generator=generator).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(776, generator=generator)).to(dtype)
    expected_residual, expected = hf_style_add_rms_norm(residual, x, weight, 1e-6)
    silu_out, norm_out = silu_mul(gate_up), add_rms_norm(residual, x, weight, 1e-6)
    assert torch.equal(residual, expected_residual)
    if dtype == torch.bfloat16:
        assert torch.equal(silu_out, F.silu(gate) * up)
        assert torch.equal(norm_out, expected)


@pytest.mark.parametrize("dtype_name", list(DTYPE_NAMES))
def test_argmax_rows_matches_torch(dtype_name, vector_path):
    """The first of equal values, NaN first of all, rows shorter than a vector or not a whole number
    of them; None for what the kernel does not take."""
    dtype = DTYPE_NAMES[dtype_name]
    logits = torch.randn(6, 1003, generator=torch.Generator().manual_seed(6)).to(dtype)
    logits[0, [3, 900]] = 20.0
    logits[1, [10, 500]] = float("nan")
    logits[2, 1001] = float("nan")
    logits[3] = float("-inf")
    logits[4, 1002] = 30.0
    for width in (1, 15, 16, 17, 1003):
        part = logits[:, :width]  # strided rows
        assert torch.equal(cpu_kernels.argmax_rows(part), part.max(dim=-1).indices), width
    assert cpu_kernels.argmax_rows(logits.t()) is None  # strided within a row
    assert cpu_kernels.argmax_rows(logits.to(torch.int32)) is None


@pytest.mark.parametrize("dtype_name", list(DTYPE_NAMES))
@pytest.mark.parametrize("rows", [1, 300])
def test_rotate_equals_apply_rotary_bit_for_bit(dtype_name, rows, make_demo_model):
    """In place on views of a fused qkv product (strided rows), as the prefill runs it; the same bits
    as rope.apply_rotary, which rounds as transformers does (tests/engine/test_rope.py)."""
    dtype = DTYPE_NAMES[dtype_name]
    heads, kv_heads, head_dim = 12, 4, 64
    rope = Architecture.from_pretrained(make_demo_model("llama")).rope  # llama3 scaling
    generator = torch.Generator().manual_seed(rows)
    qkv = (torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=generator) * 4).to(dtype)
    positions = torch.randint(0, 5000, (rows,), generator=generator)
    cos, sin = RotaryTable(rope, head_dim, dtype, torch.device("cpu")).lookup(positions, 5000)
    q = qkv[:, : heads * head_dim].view(rows, heads, head_dim)
    k = qkv[:, heads * head_dim :].view(rows, 2, kv_heads, head_dim)[:, 0]
    expected_q, expected_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    rotate(q, k, cos, sin)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # V untouched


def test_rotate_refuses_what_it_cannot_hold():
    q, k, angles = torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8)
    with pytest.raises(ValueError, match="do not agree"):
        rotate(q, k, angles[:3], angles[:3])
    with pytest.raises(ValueError, match="contiguous heads"):
        rotate(torch.randn(4, 8, 2).transpose(1, 2), k, angles, angles)
    with pytest.raises(ValueError, match="one dtype"):
        rotate(q, k.to(DTYPES["bfloat16"]), angles, angles)


def test_add_rms_norm_refuses_mismatched_inputs():
    residual = torch.randn(4, 8)
    with pytest.raises(ValueError, match="do not agree"):
        add_rms_norm(residual, torch.randn(4, 8), torch.ones(6), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        add_rms_norm(residual, torch.randn(8, 4).t(), torch.ones(8), 1e-6)


def test_without_a_compiler_the_engine_falls_back(tmp_path):
    """A failing compiler leaves a warning and the torch path, not a broken engine."""
    code = (
        "import logging; logging.basicConfig()\n"
        "from aegaeon.engine import cpu_kernels\n"
        "print('available', cpu_kernels.cpu_kernels_available())\n"
    )
    env = {**os.environ, "CC": "false", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert "available False" in proc.stdout
    assert "building the CPU kernels failed" in proc.stderr
