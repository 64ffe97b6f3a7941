"""Where a model goes in a weight region, so that the next model always fits beside it.

The engine's arena (aegaeon.memory.loader) places models in fixed slots (`slot_place`): the region
is cut into slots the size of the largest model, and a model goes at the start of a free slot, or,
when it is at most a half or a quarter of a slot, at a free half or quarter (buddy style: the parts
nest inside a slot). So a model only ever sits at one of a few fixed offsets (`slot_offsets`), and
whatever it was compiled against (CUDA graphs) at one of them stays valid after any switch; in a
region of two slots the slot the active model is not in is free once the others are evicted, so a
prefetch beside it always fits; models of up to a quarter of the largest share a slot four ways.

`place` and `room` are the engine's earlier rule, which the simulator's arena (aegaeon.sim.device)
still mirrors: a model is placed so that, were it alone in the region, it would leave `spare`
contiguous free bytes beside it (above or below), `spare` being the largest model's size (or, for a
model too large for that, everything else: it sits flush against an end). Among such offsets the
lowest free one is taken. In a region of two copies of the largest model, the free span beside
whichever model is active then holds any other model; smaller models share the region where they
fit, but a model's offset depends on what else is resident.

Torch-free, offsets relative to the region's start.
"""

from __future__ import annotations

from collections.abc import Iterable

from aegaeon.config import MEMORY_ALIGNMENT

# How many times a slot may be halved for a small model: 2 lets four models of up to a quarter of
# the largest share one slot, while each model still has at most 4 offsets per slot.
SLOT_SPLITS = 2


def slot_size(largest: int) -> int:
    """The bytes of a slot for models of up to `largest` bytes."""
    return max(-(-largest // MEMORY_ALIGNMENT), 1) * MEMORY_ALIGNMENT


def slot_part(nbytes: int, slot_bytes: int) -> int:
    """The part of a slot a model of `nbytes` takes: the slot, or its half or quarter if that holds
    it (and stays aligned)."""
    part = slot_bytes
    for _ in range(SLOT_SPLITS):
        if part % (2 * MEMORY_ALIGNMENT) or part // 2 < nbytes:
            break
        part //= 2
    return part


def slot_offsets(nbytes: int, size: int, slot_bytes: int) -> list[int]:
    """Every offset a model of `nbytes` can ever have in a region of `size` bytes, lowest first."""
    part = slot_part(nbytes, slot_bytes)
    return list(range(0, size // slot_bytes * slot_bytes, part))


def slot_place(nbytes: int, taken: Iterable[tuple[int, int]], size: int, slot_bytes: int) -> int | None:
    """The lowest of `slot_offsets` whose part is free of the (offset, nbytes) taken, or None."""
    if nbytes > slot_bytes:
        raise ValueError(f"a model of {nbytes} bytes does not fit a slot of {slot_bytes}")
    part = slot_part(nbytes, slot_bytes)
    used = [(offset, offset + slot_part(n, slot_bytes)) for offset, n in taken]
    for offset in slot_offsets(nbytes, size, slot_bytes):
        if all(offset + part <= start or offset >= stop for start, stop in used):
            return offset
    return None


def slot_room(taken: Iterable[tuple[int, int]], size: int, slot_bytes: int) -> int:
    """The largest model `slot_place` finds an offset for among `taken` (0: none)."""
    taken = list(taken)
    part = slot_bytes
    for _ in range(SLOT_SPLITS + 1):
        if slot_place(part, taken, size, slot_bytes) is not None:
            return part
        part //= 2
    return 0


def free_spans(taken: Iterable[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """(start, stop) of the free spans of a region of `size` bytes around the (offset, nbytes) taken."""
    spans, cursor = [], 0
    for offset, nbytes in sorted(taken):
        spans.append((cursor, offset))
        cursor = offset + nbytes
    spans.append((cursor, size))
    return [(start, stop) for start, stop in spans if stop > start]


def place(nbytes: int, taken: Iterable[tuple[int, int]], size: int, largest: int) -> int | None:
    """The lowest free offset for `nbytes` that keeps the rule, or None if there is none."""
    spare = min(largest, size - nbytes)
    for start, stop in free_spans(taken, size):
        # `spare` left free above the model, else below it (offset >= spare).
        offset = start if start + nbytes + spare <= size else max(start, spare)
        if offset + nbytes <= stop:
            return offset
    return None


def room(taken: Iterable[tuple[int, int]], size: int, largest: int) -> int:
    """The largest model `place` finds an offset for among `taken`."""
    best = 0
    for start, stop in free_spans(taken, size):
        if start == 0 or stop == size:
            best = max(best, stop - start)  # flush against an end leaves the rest as one span
        else:
            best = max(best, min(stop, size - largest) - start, stop - max(start, largest))
    return best
