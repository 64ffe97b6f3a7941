"""Where a model goes in a weight region, so that the next model always fits beside it.

The rule: a model is placed so that, were it alone in the region, it would leave `spare` contiguous
free bytes beside it (above or below), `spare` being the largest model's size (or, for a model too
large for that, everything else: it sits flush against an end). Among such offsets the lowest free
one is taken. In a region of two copies of the largest model, the free span beside whichever model is
active then holds any other model, so a prefetch never waits for a full load; smaller models still
share the region where they fit (two of them may sit where one large model would).

Torch-free and offsets relative to the region's start: the engine's arena (aegaeon.memory.loader)
and the simulator's copy of it (aegaeon.sim.device) both place with these functions.
"""

from __future__ import annotations

from collections.abc import Iterable


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
