"""The placement rule the engine's arena and the simulator share: what `room` promises, `place` finds."""

from __future__ import annotations

import random

from aegaeon.memory.placement import place, room


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
