"""Rotary position embeddings: a cos/sin table indexed by position, computed as HF computes it."""

from __future__ import annotations

import math

import torch

from aegaeon.engine.architecture import RopeScaling

# The table grows by doubling; start large enough that short conversations never regrow it.
INITIAL_TABLE_POSITIONS = 4096


def _initialize_vector_math() -> None:
    """Make this process's first MKL VML call (torch's CPU cos, sin, exp, ...) from one thread.

    MKL VML picks its kernels by a CPU type it detects on its first call and stores in a global in
    two steps: the raw type first, then the remapped one. A second OpenMP thread that enters VML in
    between reads the raw type, which indexes the low-accuracy VML_EP kernel, and computes its chunk
    with it (errors up to ~1.5e-4 in cos). The table below (64k elements, split over the threads) is
    usually that first call: in a few percent of processes part of the cos table came out wrong and
    float32 logits moved ~1.7e-3 off transformers'. A one-element call runs on this thread alone and
    finishes the detection before any parallel call can race it.
    """
    torch.cos(torch.zeros(1))


_initialize_vector_math()


def inverse_frequencies(rope: RopeScaling, head_dim: int) -> torch.Tensor:
    """float32 inverse frequencies, bit-for-bit the way `transformers` derives them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind != "llama3":
        return inv_freq
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryTable:
    """cos and sin per position, `[positions, head_dim]`, in the model's dtype on its device."""

    def __init__(self, rope: RopeScaling, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.inv_freq = inverse_frequencies(rope, head_dim).to(device)
        self.dtype = dtype
        self.cos = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.sin = torch.empty(0, head_dim, dtype=dtype, device=device)
        self._grow(INITIAL_TABLE_POSITIONS)

    def _grow(self, positions: int) -> None:
        steps = torch.arange(positions, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(steps, self.inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos = angles.cos().to(self.dtype)
        # HF rotates with cat(-x2, x1) * sin; we use roll(x) = cat(x2, x1) and fold the sign into
        # the first half of sin, which is exact and saves two ops per rotation.
        half = angles.shape[-1] // 2
        sin = angles.sin().to(self.dtype)
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def lookup(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin rows for `positions` (1-D), `[tokens, 1, head_dim]` to broadcast over heads."""
        if max_position >= self.cos.shape[0]:
            self._grow(max(2 * self.cos.shape[0], max_position + 1))
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate `x` `[tokens, heads, head_dim]` by the per-token angles (the rotate-half convention).

    Each product and the sum round to the dtype, as in transformers (and the CPU decode kernel); a
    fused multiply-add (addcmul) would round once and drift from both by an ulp. `out` may be `x`
    itself: both products are taken before anything is written.
    """
    return torch.add(x * cos, x.roll(x.shape[-1] // 2, dims=-1) * signed_sin, out=out)


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """Rotate queries and keys (`[tokens, heads, head_dim]` each, views allowed) in place."""
    apply_rotary(q, cos, signed_sin, out=q)
    apply_rotary(k, cos, signed_sin, out=k)
