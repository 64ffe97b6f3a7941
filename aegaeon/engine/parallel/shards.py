"""How each canonical tensor is split over the ranks of a tensor-parallel group (Megatron style).

Column-parallel products (`qkv`, `gate_up`) keep on each rank the output rows of its heads (its
slice of the intermediate size); row-parallel products (`o`, `down`) keep the matching input
columns, and their partial outputs are summed across ranks (an all-reduce). Their biases are added
once: rank 0 holds them, the other ranks hold none. The embedding and the LM head are split by
vocabulary rows (vocab-parallel): a token's embedding comes from the rank holding its row, and each
rank computes the logits of its rows. Norms are replicated. A model with fewer KV heads than ranks
replicates each KV head over `size // kv_heads` consecutive ranks, so rank r holds KV head
`r * kv_heads // size`, the head its query heads attend with.

A shard is what one rank holds; `shard_shapes` lays it out like the canonical state, so the host
model cache stores each rank's shard as one contiguous range and a switch copies 1/N of the model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from aegaeon.engine.architecture import Architecture
from aegaeon.engine.weights import canonical_shapes, canonical_sources, checkpoint_files
from aegaeon.memory.model_cache import CachedModel, tensor_views

# Row-parallel biases: added once, so only rank 0's shard holds them.
ROW_PARALLEL_BIASES = ("o_bias", "down_bias")


@dataclass(frozen=True)
class Shard:
    """Which part of a model one rank holds: rank `rank` of `size`."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} of a tensor-parallel group of {self.size} does not exist")


# The "shard" of a model run without tensor parallelism: all of it.
WHOLE_MODEL = Shard()


def check_divisible(arch: Architecture, size: int) -> None:
    """Raise a ValueError naming what does not split evenly over `size` ranks."""
    problems = []
    if arch.num_heads % size:
        problems.append(f"{arch.num_heads} attention heads")
    if arch.intermediate_size % size:
        problems.append(f"intermediate size {arch.intermediate_size}")
    kv = arch.num_kv_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        problems.append(f"{kv} KV heads")
    if problems:
        raise ValueError(
            f"tensor_parallel_size={size} does not divide this model's {', '.join(problems)}"
        )


def rank_architecture(arch: Architecture, size: int) -> Architecture:
    """The architecture one rank runs: its share of heads, KV heads (at least one) and MLP width."""
    check_divisible(arch, size)
    if size == 1:
        return arch
    return dataclasses.replace(
        arch,
        num_heads=arch.num_heads // size,
        num_kv_heads=max(1, arch.num_kv_heads // size),
        intermediate_size=arch.intermediate_size // size,
    )


def vocab_range(vocab_size: int, shard: Shard) -> tuple[int, int]:
    """The vocabulary rows `[start, end)` a rank holds: equal parts, the last one shorter."""
    part = math.ceil(vocab_size / shard.size)
    return min(vocab_size, shard.rank * part), min(vocab_size, (shard.rank + 1) * part)


def _kv_heads(arch: Architecture, shard: Shard) -> range:
    per_rank = max(1, arch.num_kv_heads // shard.size)
    first = shard.rank * arch.num_kv_heads // shard.size
    return range(first, first + per_rank)


def _qkv_rows(arch: Architecture, shard: Shard) -> list[tuple[int, int]]:
    """This rank's row ranges of the fused qkv matrix: its query heads, then its K and V heads."""
    d, heads = arch.head_dim, arch.num_heads // shard.size
    q = (shard.rank * heads * d, (shard.rank + 1) * heads * d)
    kv = _kv_heads(arch, shard)
    k = (arch.q_size + kv.start * d, arch.q_size + kv.stop * d)
    v = (k[0] + arch.kv_size, k[1] + arch.kv_size)
    return [q, k, v]


def _part(total: int, shard: Shard) -> tuple[int, int]:
    share = total // shard.size
    return shard.rank * share, (shard.rank + 1) * share


# How a canonical tensor is cut: rows (dim 0) or columns (dim 1), as ranges concatenated in order.
Cut = tuple[int, list[tuple[int, int]]]


def tensor_cuts(arch: Architecture, shard: Shard) -> dict[str, Cut | None]:
    """For each canonical tensor this rank holds, how it is cut from the whole (None: whole)."""
    inter = arch.intermediate_size
    gate, up = _part(inter, shard), tuple(inter + i for i in _part(inter, shard))
    vocab = vocab_range(arch.vocab_size, shard)
    by_kind: dict[str, Cut | None] = {
        "qkv": (0, _qkv_rows(arch, shard)),
        "qkv_bias": (0, _qkv_rows(arch, shard)),
        "o": (1, [_part(arch.q_size, shard)]),
        "gate_up": (0, [gate, up]),
        "gate_up_bias": (0, [gate, up]),
        "down": (1, [_part(inter, shard)]),
        "embed": (0, [vocab]),
        "lm_head": (0, [vocab]),
    }
    cuts = {}
    for name in canonical_shapes(arch):
        kind = name.rsplit(".", 1)[-1]
        if kind in ROW_PARALLEL_BIASES and shard.rank > 0:
            continue
        cuts[name] = by_kind.get(kind) if shard.size > 1 else None
    return cuts


def shard_shapes(arch: Architecture, shard: Shard) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of one rank's shard, in canonical order (`arch` is the whole model)."""
    whole = canonical_shapes(arch)
    shapes = {}
    for name, cut in tensor_cuts(arch, shard).items():
        shape = list(whole[name])
        if cut is not None:
            dim, ranges = cut
            shape[dim] = sum(end - start for start, end in ranges)
        shapes[name] = tuple(shape)
    return shapes


def cut(tensor: torch.Tensor, how: Cut | None) -> torch.Tensor:
    """The part of a whole canonical tensor a rank holds."""
    if how is None:
        return tensor
    dim, ranges = how
    return torch.cat([tensor.narrow(dim, start, end - start) for start, end in ranges], dim=dim)


def read_shard(
    model_dir: Path, arch: Architecture, shard: Shard, dtype: torch.dtype
) -> Callable[[torch.Tensor, CachedModel, Callable[[int], None]], None]:
    """A host model cache fill writing one rank's shard of the checkpoint (each tensor read whole,
    then cut: sources are concatenated as in the canonical layout, then this rank's part kept)."""

    def fill(entry: torch.Tensor, layout: CachedModel, progress: Callable[[int], None]) -> None:
        sources, cuts = canonical_sources(arch), tensor_cuts(arch, shard)
        with ExitStack() as stack:
            where = {}
            for file in checkpoint_files(model_dir):
                opened = stack.enter_context(safe_open(file, framework="pt"))
                where.update(dict.fromkeys(opened.keys(), opened))
            for name, view in tensor_views(entry, 0, layout).items():
                missing = [source for source in sources[name] if source not in where]
                if missing:
                    raise ValueError(f"checkpoint {model_dir} is missing tensor {missing[0]!r}")
                whole = torch.cat([where[source].get_tensor(source) for source in sources[name]])
                view.copy_(cut(whole, cuts[name]).to(dtype))
                progress(view.numel() * view.element_size())

    return fill
