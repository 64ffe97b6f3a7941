"""Placement rules: the engine's fixed slots and the simulator's rule; what `room` promises, `place` finds."""

from __future__ import annotations

import random

from aegaeon.config import MEMORY_ALIGNMENT
from aegaeon.memory.placement import (
    SLOT_SPLITS,
    place,
    room,
    slot_offsets,
    slot_part,
    slot_place,
    slot_room,
    slot_size,
)


def random_layout(rng: random.Random, size: int) -> list[tuple[int, int]]:
    taken, cursor = [], 0
    while True:
        cursor += rng.randint(0, 10)
        nbytes = rng.randint(1, 15)
        if cursor + nbytes > size or rng.random() < 0.3:
            return taken
        taken.append((cursor, nbytes))
        cursor += nbytes


def test_room_is_exactly_the_largest_model_place_finds_an_offset_for() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        size = rng.randint(10, 60)
        largest = rng.randint(1, size)
        taken = random_layout(rng, size)
        most = room(taken, size, largest)
        for nbytes in range(1, size + 1):
            offset = place(nbytes, taken, size, largest)
            assert (offset is not None) == (nbytes <= most), (size, largest, taken, nbytes)
            if offset is None:
                continue
            assert all(offset + nbytes <= start or offset >= start + n for start, n in taken)
            spare = min(largest, size - nbytes)  # alone, it leaves `spare` free above or below it
            assert offset >= spare or offset + nbytes + spare <= size


def test_in_two_copies_of_the_largest_any_model_fits_beside_any_placed_one() -> None:
    largest, size = 60, 120
    for nbytes in range(1, largest + 1):
        for offset in range(size - nbytes + 1):
            if offset >= largest or offset + nbytes + largest <= size:  # wherever the rule allows it
                assert room([(offset, nbytes)], size, largest) >= largest, (nbytes, offset)


# --- fixed slots (the engine's arena) ---------------------------------------------------------


def slot_layout(rng: random.Random, size: int, slot_bytes: int) -> list[tuple[int, int]]:
    """Models of random sizes placed by `slot_place` until one does not fit."""
    taken: list[tuple[int, int]] = []
    while rng.random() < 0.8:
        nbytes = rng.randint(1, slot_bytes)
        offset = slot_place(nbytes, taken, size, slot_bytes)
        if offset is None:
            break
        taken.append((offset, nbytes))
    return taken


def test_slot_room_is_exactly_the_largest_model_slot_place_finds_an_offset_for() -> None:
    rng = random.Random(1)
    for _ in range(1000):
        slot_bytes = slot_size(rng.randint(1, 400))
        size = slot_bytes * rng.randint(1, 4) + rng.randint(0, slot_bytes - 1)
        taken = slot_layout(rng, size, slot_bytes)
        most = slot_room(taken, size, slot_bytes)
        for nbytes in range(1, slot_bytes + 1, max(1, slot_bytes // 97)):
            offset = slot_place(nbytes, taken, size, slot_bytes)
            assert (offset is not None) == (nbytes <= most), (slot_bytes, size, taken, nbytes)
            if offset is None:
                continue
            assert offset in slot_offsets(nbytes, size, slot_bytes)  # one of a few fixed offsets
            part = slot_part(nbytes, slot_bytes)
            assert offset + part <= size // slot_bytes * slot_bytes
            assert all(
                offset + part <= start or offset >= start + slot_part(n, slot_bytes) for start, n in taken
            )


def test_slot_offsets_are_few_and_aligned() -> None:
    slot_bytes = slot_size(1020)
    assert slot_bytes == 1024 and slot_size(1024) == 1024 and slot_size(1025) == 1040
    size = 3 * slot_bytes + 10
    assert slot_offsets(1000, size, slot_bytes) == [0, slot_bytes, 2 * slot_bytes]
    assert len(slot_offsets(slot_bytes // 2, size, slot_bytes)) == 6
    assert len(slot_offsets(1, size, slot_bytes)) == 3 << SLOT_SPLITS  # quarters at most
    assert all(offset % MEMORY_ALIGNMENT == 0 for offset in slot_offsets(1, size, slot_bytes))
    # A slot whose halves would not be aligned is not split.
    assert slot_offsets(1, 3 * 1040, 1040) == [0, 1040, 2080]


def test_in_two_slots_any_model_fits_beside_any_placed_one() -> None:
    slot_bytes = slot_size(60)
    for nbytes in range(1, slot_bytes + 1):
        for offset in slot_offsets(nbytes, 2 * slot_bytes, slot_bytes):
            assert slot_room([(offset, nbytes)], 2 * slot_bytes, slot_bytes) == slot_bytes, (nbytes, offset)
