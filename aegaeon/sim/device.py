"""The weights resident on one simulated device, and when their copies land.

Mirrors the engine's arena (aegaeon.memory.loader.ResidentModels): each model is placed at the first
gap of the weight region that fits it, evicting the most recently used models it may evict (never
one it was told to keep) until one does; copies from host memory go one after another over the
device's link, each taking the profile's switch time. A prefetch is such a copy started in the
background.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Resident:
    model: str
    offset: int
    nbytes: int
    ready_s: float  # when its copy lands (it can be in the future: a load or prefetch in flight)


class ResidentWeights:
    """The models on one device, placed first-fit, evicted most recently used first (as the engine)."""

    def __init__(
        self, capacity_bytes: int, weight_bytes: Callable[[str], int], load_s: Callable[[str], float]
    ):
        self.capacity_bytes = capacity_bytes
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

    def _gaps(self, entries: list[Resident]) -> list[tuple[int, int]]:
        """(offset, size) of the free gaps around `entries`, in address order."""
        gaps, offset = [], 0
        for entry in sorted(entries, key=lambda e: e.offset):
            gaps.append((offset, entry.offset - offset))
            offset = entry.offset + entry.nbytes
        return [*gaps, (offset, self.capacity_bytes - offset)]

    def room_keeping(self, keep: frozenset[str]) -> int:
        """The largest model that could be placed once every model not in `keep` is evicted."""
        return max(size for _, size in self._gaps([e for e in self.stack if e.model in keep]))

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
        while (offset := next((o for o, size in self._gaps(self.stack) if size >= nbytes), None)) is None:
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
