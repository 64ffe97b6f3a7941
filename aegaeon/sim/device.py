"""The weights resident on one simulated device, and when their copies land.

Mirrors the engine's arena (aegaeon.memory.loader.ResidentModels) with the same placement functions
(aegaeon.memory.placement, torch-free): each model is placed where, kept alone, it leaves a free span
of the largest model's size beside it (the lowest such free offset), evicting the most recently used
models it may evict (never one it was told to keep) until there is one; copies from host memory go
one after another over the device's link, each taking the profile's switch time. A prefetch is such a
copy started in the background (which on a CPU still takes the computing cores' time: the instance
loop waits for it there, see `has_copy_engine`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aegaeon.memory.placement import place, room


def has_copy_engine(device: str) -> bool:
    """Whether copies to `device` run beside its computation (a GPU's copy engines) or, as on a CPU,
    take the time of the cores that compute (aegaeon.memory.copies runs them inline or on a thread)."""
    return device.lower() != "cpu"


@dataclass
class Resident:
    model: str
    offset: int
    nbytes: int
    ready_s: float  # when its copy lands (it can be in the future: a load or prefetch in flight)


class ResidentWeights:
    """The models on one device, placed as the engine places them, evicted most recently used first.

    `largest_bytes`: the span each model leaves free beside it, the largest model's size, as the engine
    takes it (None: half the region, that size in a region of two copies of the largest model); a
    prefetch beside the active model then always fits.
    """

    def __init__(
        self,
        capacity_bytes: int,
        weight_bytes: Callable[[str], int],
        load_s: Callable[[str], float],
        largest_bytes: int | None = None,
    ):
        self.capacity_bytes = capacity_bytes
        self.largest_bytes = largest_bytes if largest_bytes is not None else capacity_bytes // 2
        self._weight_bytes = weight_bytes
        self._load_s = load_s
        self.stack: list[Resident] = []  # in load order
        self._used: dict[str, int] = {}  # model -> when last used (a counter)
        self._clock = 0
        # The link copies one model at a time: the next copy starts when the previous one is done.
        self.link_free_s = 0.0
        self.loads = 0

    def get(self, model: str) -> Resident | None:
        for entry in self.stack:
            if entry.model == model:
                return entry
        return None

    def is_resident(self, model: str) -> bool:
        return self.get(model) is not None

    def touch(self, model: str) -> None:
        """`model` became active: it is now the most recently used."""
        self._clock += 1
        self._used[model] = self._clock

    def models(self) -> list[str]:
        return [entry.model for entry in self.stack]

    def room_keeping(self, keep: frozenset[str]) -> int:
        """The largest model that could be placed once every model not in `keep` is evicted."""
        taken = [(e.offset, e.nbytes) for e in self.stack if e.model in keep]
        return room(taken, self.capacity_bytes, self.largest_bytes)

    def _place(self, nbytes: int) -> int | None:
        taken = [(e.offset, e.nbytes) for e in self.stack]
        return place(nbytes, taken, self.capacity_bytes, self.largest_bytes)

    def load(self, model: str, now: float, keep: frozenset[str] = frozenset()) -> Resident:
        """Make `model` resident, starting its copy when the link is free; evicting others to make room."""
        entry = self.get(model)
        if entry is not None:
            return entry
        nbytes = self._weight_bytes(model)
        if nbytes > self.capacity_bytes:
            raise ValueError(
                f"model {model} ({nbytes} bytes) does not fit the device's {self.capacity_bytes}"
            )
        while (offset := self._place(nbytes)) is None:
            victims = [e for e in self.stack if e.model not in keep]
            if not victims:
                raise ValueError(f"no room for {model} while keeping {sorted(keep)}")
            self.stack.remove(max(victims, key=lambda e: self._used.get(e.model, 0)))
        start = max(now, self.link_free_s)
        entry = Resident(model, offset, nbytes, start + self._load_s(model))
        self.link_free_s = entry.ready_s
        self.stack.append(entry)
        self.touch(model)
        self.loads += 1
        return entry

    def prefetch(self, model: str, now: float, active: str | None) -> bool:
        """Start copying `model` beside the active one; False if there is no room without evicting it."""
        if self.is_resident(model):
            return True
        keep = frozenset({active}) if active is not None else frozenset()
        if self.room_keeping(keep) < self._weight_bytes(model):
            return False
        self.load(model, now, keep)
        return True


class SlotWeights(ResidentWeights):
    """An alternative arena: fixed slots, each as large as the largest model; a load replaces the
    least recently used slot not kept. Prefetching beside the active model then always finds room
    when there are two slots, whatever the models' sizes."""

    def __init__(
        self,
        capacity_bytes: int,
        weight_bytes: Callable[[str], int],
        load_s: Callable[[str], float],
        slot_bytes: int,
    ):
        super().__init__(capacity_bytes, weight_bytes, load_s)
        if slot_bytes < 1 or capacity_bytes < slot_bytes:
            raise ValueError(f"{capacity_bytes} bytes cannot hold one {slot_bytes}-byte slot")
        self.slots = capacity_bytes // slot_bytes

    def room_keeping(self, keep: frozenset[str]) -> int:
        evictable = [e for e in self.stack if e.model not in keep]
        return self.capacity_bytes if len(self.stack) < self.slots or evictable else 0

    def load(self, model: str, now: float, keep: frozenset[str] = frozenset()) -> Resident:
        entry = self.get(model)
        if entry is not None:
            return entry
        if len(self.stack) >= self.slots:
            evictable = [e for e in self.stack if e.model not in keep]
            if not evictable:
                raise ValueError(f"no slot for {model} while keeping {sorted(keep)}")
            victim = min(evictable, key=lambda e: self._used.get(e.model, 0))
            self.stack.remove(victim)
        start = max(now, self.link_free_s)
        entry = Resident(model, 0, self._weight_bytes(model), start + self._load_s(model))
        self.link_free_s = entry.ready_s
        self.stack.append(entry)
        self.loads += 1
        self.touch(model)
        return entry
