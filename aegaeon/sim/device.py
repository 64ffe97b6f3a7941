"""The weights resident on one simulated device, and when their copies land.

Mirrors the engine's arena (aegaeon.memory.loader.ResidentModels): models are stacked above the KV
region, a load pops models off the top until the new one fits (never one it was told to keep), and
copies from host memory go one after another over the device's link, each taking the profile's
switch time. A prefetch is such a copy started in the background.
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
    """The stack of models on one device."""

    def __init__(
        self, capacity_bytes: int, weight_bytes: Callable[[str], int], load_s: Callable[[str], float]
    ):
        self.capacity_bytes = capacity_bytes
        self._weight_bytes = weight_bytes
        self._load_s = load_s
        self.stack: list[Resident] = []
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
        """`model` became active (the stack does not care; slots evict the least recently used)."""

    def models(self) -> list[str]:
        return [entry.model for entry in self.stack]

    def _top(self) -> int:
        return self.stack[-1].offset + self.stack[-1].nbytes if self.stack else 0

    def room_keeping(self, keep: frozenset[str]) -> int:
        """Bytes a new model could have once every model above the topmost one in `keep` is popped."""
        floor = 0
        for entry in self.stack:
            if entry.model in keep:
                floor = entry.offset + entry.nbytes
        return self.capacity_bytes - floor

    def load(self, model: str, now: float, keep: frozenset[str] = frozenset()) -> Resident:
        """Make `model` resident, starting its copy when the link is free; popping others to make room."""
        entry = self.get(model)
        if entry is not None:
            return entry
        nbytes = self._weight_bytes(model)
        if nbytes > self.capacity_bytes:
            raise ValueError(
                f"model {model} ({nbytes} bytes) does not fit the device's {self.capacity_bytes}"
            )
        while self.capacity_bytes - self._top() < nbytes:
            if not self.stack or self.stack[-1].model in keep:
                raise ValueError(f"no room for {model} while keeping {sorted(keep)}")
            self.stack.pop()
        start = max(now, self.link_free_s)
        entry = Resident(model, self._top(), nbytes, start + self._load_s(model))
        self.link_free_s = entry.ready_s
        self.stack.append(entry)
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
    least recently used slot not kept. Prefetching beside the active model then always finds room,
    which the live engine's stack does not guarantee (a model below the active one cannot be freed)."""

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
        self._used: dict[str, int] = {}  # model -> when last used (a counter)
        self._clock = 0

    def touch(self, model: str) -> None:
        self._clock += 1
        self._used[model] = self._clock

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
