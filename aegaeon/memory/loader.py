"""Scale-up: copy a cached model's byte range into the device arena and view its tensors there.

The copy goes in large chunks. On CUDA it runs on a dedicated stream from page-locked host memory,
so it proceeds at close to the link's bandwidth while the compute stream keeps decoding another
model (a prefetch); an event marks its end. On the CPU a prefetch runs the same chunked copy on a
background thread (a tensor copy releases the GIL).

`ResidentModels` keeps the models whose weights are in the arena. It takes the whole weight region
above the KV region from the arena once (so the arena's high-water mark never moves), cuts it into
slots the size of the largest model and places each model at the start of a free slot, or of a free
half or quarter of one when the model fits that (`aegaeon.memory.placement.slot_place`). A model's
weights therefore always start at one of a few fixed addresses (`addresses`), so what is captured
against them (CUDA graphs of decode steps) can be kept per (model, address) and replayed after any
switch; with two slots a prefetch beside the active model always fits. When no part is free it
evicts models it may evict until one is. The victim is the most recently used model it may evict:
the decode rounds visit models cyclically, so the model used last is the one needed again last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aegaeon.config import MEMORY_ALIGNMENT
from aegaeon.memory.arena import DeviceArena
from aegaeon.memory.copies import Copy, CopyStream
from aegaeon.memory.model_cache import CachedModel, HostModelCache, tensor_views
from aegaeon.memory.placement import slot_offsets, slot_place, slot_room, slot_size


class ModelLoader:
    """Chunked copies of cached models into the arena."""

    def __init__(self, arena: DeviceArena, cache: HostModelCache, copies: CopyStream, chunk_bytes: int):
        self.arena = arena
        self.cache = cache
        self.copies = copies
        self.chunk_bytes = chunk_bytes

    def copy(self, model: CachedModel, offset: int, background: bool) -> Copy:
        """Start copying `model` to arena byte `offset`; on the CPU inline unless `background`."""
        source = self.cache.buffer[model.offset : model.offset + model.nbytes]
        target = self.arena.buffer[offset : offset + model.nbytes]
        chunks = [
            (target[start : start + self.chunk_bytes], source[start : start + self.chunk_bytes])
            for start in range(0, model.nbytes, self.chunk_bytes)
        ]
        return self.copies.copy(chunks, background)


@dataclass
class Resident:
    """A model whose weights are (or are being copied) in the arena."""

    key: str
    offset: int
    nbytes: int
    tensors: dict[str, torch.Tensor]
    copy: Copy = field(default_factory=Copy)


class ResidentModels:
    """The models held in the arena's weight region, each at one of a few fixed addresses.

    The region is cut into slots of `slot_size(largest)` bytes (aegaeon.memory.placement); a model
    takes the lowest free slot, or half or quarter of one if it fits that, else the most recently
    used models not kept are evicted until one is free. With two slots, evicting everything but the
    active model therefore always makes room for any other (`room_keeping` of the active model is a
    whole slot), while small models share slots. `largest`: the largest model it will hold (the
    engine passes it); None, half the weight region (two slots).
    """

    def __init__(self, arena: DeviceArena, loader: ModelLoader, largest: int | None = None):
        self.arena = arena
        self.loader = loader
        self.base = arena.top  # everything below belongs to the KV region
        self.end = arena.capacity
        if self.end > self.base:
            arena.allocate(self.end - self.base)  # the weight region, managed here from now on
        half = self.capacity() // 2 // MEMORY_ALIGNMENT * MEMORY_ALIGNMENT
        self.slot_bytes = slot_size(largest) if largest is not None else half
        self.slots = self.capacity() // self.slot_bytes if self.slot_bytes else 0
        self.entries: list[Resident] = []
        self._last_used: dict[str, int] = {}
        self._clock = 0
        self.loads = 0
        self.evictions = 0

    def get(self, key: str) -> Resident | None:
        return next((entry for entry in self.entries if entry.key == key), None)

    def capacity(self) -> int:
        """Bytes available to model weights in all."""
        return self.end - self.base

    def addresses(self, nbytes: int) -> list[int]:
        """The arena offsets where a model of `nbytes` can ever be placed (a small fixed set)."""
        return [self.base + offset for offset in slot_offsets(nbytes, self.capacity(), self.slot_bytes)]

    def use(self, model: CachedModel) -> Resident:
        """The model, resident (loaded if it was not), marked as the most recently used."""
        entry = self.get(model.key) or self.load(model)
        self._touch(entry.key)
        return entry

    def touch(self, key: str) -> Resident | None:
        """The resident model under `key` marked as the most recently used; None if not resident."""
        entry = self.get(key)
        if entry is not None:
            self._touch(key)
        return entry

    def copying(self) -> set[str]:
        """Keys of the models whose copy into the arena has not ended (their host bytes are read)."""
        return {entry.key for entry in self.entries if not entry.copy.done()}

    def load(
        self, model: CachedModel, keep: frozenset[str] = frozenset(), background: bool = False
    ) -> Resident:
        """Make `model` resident (starting its copy), evicting models not in `keep` to make room.

        Raises RuntimeError when the models in `keep` (or the arena's size) leave no room for it.
        """
        entry = self.get(model.key)
        if entry is not None:
            return entry
        if model.nbytes > self.slot_bytes or self.slots == 0:
            raise RuntimeError(
                f"model {model.key} needs {model.nbytes} bytes but the arena's weight slots hold "
                f"{self.slot_bytes} ({self.slots} of them in {self.capacity()} bytes for weights; raise "
                "cpu_arena_bytes or device_memory_fraction, or lower kv_cache_bytes)"
            )
        while (offset := self._place(model.nbytes)) is None:
            victims = [e for e in self.entries if e.key not in keep]
            if not victims:
                raise RuntimeError(f"no room in the arena for {model.key} while keeping {sorted(keep)}")
            self._evict(max(victims, key=lambda e: self._last_used.get(e.key, 0)))
        entry = Resident(model.key, offset, model.nbytes, tensor_views(self.arena.buffer, offset, model))
        entry.copy = self.loader.copy(model, offset, background)
        self.entries.append(entry)
        self._touch(entry.key)
        self.loads += 1
        return entry

    def room_keeping(self, keep: frozenset[str]) -> int:
        """The largest model that could be placed once every model not in `keep` is evicted."""
        return slot_room(
            self._taken([e for e in self.entries if e.key in keep]), self.capacity(), self.slot_bytes
        )

    def _place(self, nbytes: int) -> int | None:
        offset = slot_place(nbytes, self._taken(self.entries), self.capacity(), self.slot_bytes)
        return None if offset is None else self.base + offset

    def _taken(self, entries: list[Resident]) -> list[tuple[int, int]]:
        return [(entry.offset - self.base, entry.nbytes) for entry in entries]

    def _touch(self, key: str) -> None:
        self._clock += 1
        self._last_used[key] = self._clock

    def _evict(self, entry: Resident) -> None:
        entry.copy.wait()  # its bytes must not be overwritten while a copy still writes them
        self.entries.remove(entry)
        self._last_used.pop(entry.key, None)
        self.evictions += 1
