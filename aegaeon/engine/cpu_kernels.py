"""The engine's CPU kernels (`cpu_kernels.c`): paged decode attention, rotary embedding, residual
add + RMS norm, SiLU * up, and the greedy argmax of logits.

They are built with the system's C compiler for this CPU (`-march=native`, aegaeon/native.py) and
loaded with ctypes. Where no compiler is found the engine keeps its torch paths (gather + SDPA,
torch's norm), which give the same results, only slower.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

import torch

from aegaeon.engine.paged_decode import check_paged_decode_inputs
from aegaeon.native import load_library

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# Vectorising a float sum needs reassociation; -ffast-math would also do it, but GCC then links
# crtfastmath into the library, which turns on flush-to-zero for the whole process (torch included).
CFLAGS = (
    "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared",
    "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
    "-ffp-contract=off",  # rotary products and sums round as torch rounds them (intrinsics still fuse)
)  # fmt: skip
_DTYPE_SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_PAGED_DECODE_ARGTYPES = [
    ctypes.c_void_p, ctypes.c_int64,  # q, q_row_stride
    ctypes.c_void_p, ctypes.c_int64,  # new_kv, new_kv_row_stride
    ctypes.c_void_p, ctypes.c_void_p,  # rotary cos, sin
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # kv, strides
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,  # block_tables, table_stride, context_lens
    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # rows, heads, kv heads, head_dim
    ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int32,  # window, scale, out, threads
]  # fmt: skip
_ROTARY_ARGTYPES = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # q, q_row_stride, q_heads
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # k, k_row_stride, k_heads
    ctypes.c_void_p, ctypes.c_void_p,  # cos, sin
    ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,  # rows, head_dim, threads
]  # fmt: skip
_ADD_RMS_NORM_ARGTYPES = [
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # residual, x, weight, out
    ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int32,  # rows, dim, eps, threads
]  # fmt: skip
_SILU_MUL_ARGTYPES = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,  # gate_up, row_stride, out
    ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,  # rows, inter, threads
]  # fmt: skip
_ARGMAX_ARGTYPES = [
    ctypes.c_void_p, ctypes.c_int64,  # logits, row_stride
    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,  # rows, vocab, out
]  # fmt: skip
_ARGTYPES = {
    "argmax": _ARGMAX_ARGTYPES,
    "paged_decode": _PAGED_DECODE_ARGTYPES,
    "rotary": _ROTARY_ARGTYPES,
    "add_rms_norm": _ADD_RMS_NORM_ARGTYPES,
    "silu_mul": _SILU_MUL_ARGTYPES,
}


def build_for(march: str = "native") -> ctypes.CDLL | None:
    """The kernels compiled for `-march=<march>` ("native": this CPU) and loaded, or None.

    Which vector paths the source takes follows the target (AVX-512, AVX2, plain loops), so a CPU
    that has them all can build and check each one (e.g. "x86-64-v3": AVX2; "x86-64": none).
    """
    flags = tuple(f"-march={march}" if flag == "-march=native" else flag for flag in CFLAGS)
    library = load_library(SOURCE, flags, "the CPU kernels", "they run on their slower torch paths")
    if library is None:
        return None
    for suffix in _DTYPE_SUFFIXES.values():
        for name, argtypes in _ARGTYPES.items():
            function = getattr(library, f"{name}_{suffix}")
            function.argtypes, function.restype = argtypes, None
    for name in ("paged_decode_max_head_dim", "paged_decode_max_group"):
        getattr(library, name).restype = ctypes.c_int64
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    return build_for("native")


def cpu_kernels_available() -> bool:
    """Whether the C kernels are built (building them now if needed) and loadable."""
    return _library() is not None


def _kernel(name: str, dtype: torch.dtype) -> Callable[..., None]:
    """The C function `name` for tensors of `dtype`."""
    library = _library()
    if library is None:
        raise RuntimeError("the CPU kernels are not available (no C compiler, or their build failed)")
    return getattr(library, f"{name}_{_DTYPE_SUFFIXES[dtype]}")


@functools.cache
def cpu_decode_supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel is available and its per-task scratch holds this attention shape."""
    library = _library()
    return (
        library is not None
        and head_dim <= library.paged_decode_max_head_dim()
        and num_heads // num_kv_heads <= library.paged_decode_max_group()
    )


@functools.cache
def cpu_rotary_supports(head_dim: int) -> bool:
    """Whether the kernels are available and the rotary kernel's scratch holds a head of this size."""
    library = _library()
    return library is not None and head_dim % 2 == 0 and head_dim <= library.paged_decode_max_head_dim()


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    new_kv: torch.Tensor | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode attention `[rows, heads, head_dim]` of one query token per row over its paged KV, first
    rotating q and the new K by `rotary` and storing `new_kv` at position `ctx - 1` (paged_decode.py)."""
    check_paged_decode_inputs(q, kv_cache, layer, block_tables, context_lens, sliding_window, new_kv, rotary)
    rows, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[4]
    if not cpu_decode_supports(num_heads, num_kv_heads, head_dim):
        raise ValueError(
            f"the CPU kernel does not support {num_heads} query heads, {num_kv_heads} KV heads of {head_dim}"
            " (or it could not be built)"
        )
    if q.device.type != "cpu" or not kv_cache.is_contiguous():
        raise ValueError("the CPU kernel needs CPU tensors and a contiguous KV cache")
    # The kernel walks heads and dimensions contiguously; rows may be strided (views of qkv).
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    if new_kv is not None and new_kv.stride()[1:] != (num_kv_heads * head_dim, head_dim, 1):
        new_kv = new_kv.contiguous()
    if rotary is not None:
        rotary = (rotary[0].contiguous(), rotary[1].contiguous())
    return LayerKernels(q.dtype).paged_decode(
        q, kv_cache, layer, block_tables.contiguous(), context_lens.contiguous(), scale, sliding_window,
        new_kv=new_kv, rotary=rotary,
    )  # fmt: skip


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """Rotate q `[rows, heads, head_dim]` and k `[rows, kv_heads, head_dim]` in place by the rows'
    angles (`[rows, 1, head_dim]`, RotaryTable.lookup), as `rope.apply_rotary` does."""
    rows, _, head_dim = q.shape
    tensors = (q, k, cos, signed_sin)
    if any(t.dtype != q.dtype or t.device.type != "cpu" for t in tensors):
        raise ValueError("rotate needs CPU tensors of one dtype")
    angles_shape = (rows, 1, head_dim)
    if k.shape[0] != rows or k.shape[2] != head_dim or not cos.shape == signed_sin.shape == angles_shape:
        raise ValueError(
            f"rotate: shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(cos.shape)} do not agree"
        )
    if not cpu_rotary_supports(head_dim):
        raise ValueError(
            f"rotate: head_dim {head_dim} is odd or too large (or the kernels could not be built)"
        )
    # Heads and dimensions contiguous (rows may be strided: views of qkv); the angles contiguous.
    for x in (q, k):
        if x.stride()[1:] != (head_dim, 1):
            raise ValueError("rotate: q and k need contiguous heads")
    LayerKernels(q.dtype).rotate(q, k, cos.contiguous(), signed_sin.contiguous())


def argmax_rows(logits: torch.Tensor) -> torch.Tensor | None:
    """int64 index of each row's largest value in `logits` `[rows, vocab]` (the first on ties, the
    first NaN if any: what `max(dim=-1)` returns), or None where the kernel cannot take the tensor
    (not on the CPU, another dtype, strided within rows, or the kernels not built)."""
    if (
        logits.dim() != 2
        or logits.device.type != "cpu"
        or logits.dtype not in _DTYPE_SUFFIXES
        or logits.stride(1) != 1
        or _library() is None
    ):
        return None
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.long)
    if vocab == 0:
        raise ValueError("argmax_rows: rows of no values have no largest")
    _kernel("argmax", logits.dtype)(logits.data_ptr(), logits.stride(0), rows, vocab, out.data_ptr())
    return out


def add_rms_norm(
    residual: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """`residual += x` in place (unless x is None), then the RMS norm of `residual` times `weight`
    (transformers' RMSNorm: float32 inside, rounded to the dtype before and after the weight)."""
    dim = weight.shape[0]
    tensors = (residual, weight) if x is None else (residual, x, weight)
    if any(t.dtype != residual.dtype or not t.is_contiguous() or t.device.type != "cpu" for t in tensors):
        raise ValueError("add_rms_norm needs contiguous CPU tensors of one dtype")
    if residual.shape[-1] != dim or (x is not None and x.shape != residual.shape):
        raise ValueError(
            f"add_rms_norm: shapes {tuple(residual.shape)} and {tuple(weight.shape)} do not agree"
        )
    return LayerKernels(residual.dtype).add_rms_norm(residual, x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` `[rows, inter]` of the fused gate_up product `[rows, 2 * inter]`."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1 or gate_up.device.type != "cpu":
        raise ValueError(
            f"silu_mul needs a CPU [rows, 2 * inter] tensor with contiguous rows, got {gate_up.shape}"
        )
    return LayerKernels(gate_up.dtype).silu_mul(gate_up)


class LayerKernels:
    """The decode attention, norm and activation kernels for one dtype, as the model's layer loop
    calls them.

    The loop hands them tensors it shaped itself (products of the model's own weights, the runner's
    tables), so the checks of the module's functions are left out here: right after a large matrix
    product the caches are cold and every Python line costs about a microsecond.
    """

    def __init__(self, dtype: torch.dtype):
        self._paged_decode = _kernel("paged_decode", dtype)
        self._rotary = _kernel("rotary", dtype)
        self._add_rms_norm = _kernel("add_rms_norm", dtype)
        self._silu_mul = _kernel("silu_mul", dtype)

    def paged_decode(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        layer: int,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
        sliding_window: int | None = None,
        new_kv: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """As the module's `paged_decode_attention`, for inputs it would accept as they are: q and
        new_kv with contiguous heads (rows may be strided), everything else contiguous."""
        rows, num_heads, head_dim = q.shape
        out = torch.empty(rows, num_heads, head_dim, dtype=q.dtype)
        strides = kv_cache.stride()
        k_offset = layer * strides[1]
        cos, sin = (None, None) if rotary is None else (rotary[0].data_ptr(), rotary[1].data_ptr())
        self._paged_decode(
            q.data_ptr(), q.stride(0),
            None if new_kv is None else new_kv.data_ptr(), 0 if new_kv is None else new_kv.stride(0),
            cos, sin, kv_cache.data_ptr(), strides[0], k_offset, k_offset + strides[2], strides[3],
            block_tables.data_ptr(), block_tables.stride(0), context_lens.data_ptr(),
            rows, num_heads, kv_cache.shape[4], head_dim,
            sliding_window or 0, scale, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
        """As the module's `rotate`, for inputs it would accept as they are (angles contiguous)."""
        self._rotary(
            q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0), k.shape[1],
            cos.data_ptr(), signed_sin.data_ptr(), q.shape[0], q.shape[2], torch.get_num_threads(),
        )  # fmt: skip

    def add_rms_norm(
        self, residual: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """As the module's `add_rms_norm`, for contiguous CPU tensors of this dtype."""
        out = torch.empty_like(residual)
        dim = weight.shape[0]
        self._add_rms_norm(
            residual.data_ptr(), None if x is None else x.data_ptr(), weight.data_ptr(), out.data_ptr(),
            residual.numel() // dim, dim, eps, torch.get_num_threads(),
        )  # fmt: skip
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """As the module's `silu_mul`, for a CPU tensor of this dtype with contiguous rows."""
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, inter, dtype=gate_up.dtype)
        self._silu_mul(
            gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), rows, inter, torch.get_num_threads()
        )
        return out
