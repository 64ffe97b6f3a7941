"""Scale-up: copy a cached model's byte range into the device arena and view its tensors there.

The copy goes in large chunks. On CUDA it runs on a dedicated stream from page-locked host memory,
so it proceeds at close to the link's bandwidth while the compute stream keeps decoding another
model (a prefetch); an event marks its end. On the CPU a prefetch runs the same chunked copy on a
background thread (a tensor copy releases the GIL).

`ResidentModels` keeps the models whose weights are in the arena, stacked above the KV region in
the order they were loaded. Making room pops models off the top of the stack: a pointer reset, no
fragmentation. Popping the most recently loaded model is also the right victim for the decode
rounds, which visit models cyclically: the model used last is the one needed again last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aegaeon.memory.arena import DeviceArena
from aegaeon.memory.copies import Copy, CopyStream
from aegaeon.memory.model_cache import CachedModel, HostModelCache, tensor_views


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
    """The stack of models held in the arena above the KV region."""

    def __init__(self, arena: DeviceArena, loader: ModelLoader):
        self.arena = arena
        self.loader = loader
        self.base = arena.top  # everything below belongs to the KV region
        self.stack: list[Resident] = []
        self.loads = 0
        self.evictions = 0

    def get(self, key: str) -> Resident | None:
        return next((entry for entry in self.stack if entry.key == key), None)

    def capacity(self) -> int:
        """Bytes available to model weights in all."""
        return self.arena.capacity - self.base

    def load(
        self, model: CachedModel, keep: frozenset[str] = frozenset(), background: bool = False
    ) -> Resident:
        """Make `model` resident (starting its copy), popping models not in `keep` to make room.

        Raises RuntimeError when the models in `keep` (or the arena's size) leave no room for it.
        """
        entry = self.get(model.key)
        if entry is not None:
            return entry
        if model.nbytes > self.capacity():
            raise RuntimeError(
                f"model {model.key} needs {model.nbytes} bytes but the arena has {self.capacity()} for "
                "weights (raise cpu_arena_bytes or device_memory_fraction, or lower kv_cache_bytes)"
            )
        while self.arena.capacity - self.arena.top < model.nbytes:
            if not self.stack or self.stack[-1].key in keep:
                raise RuntimeError(f"no room in the arena for {model.key} while keeping {sorted(keep)}")
            self._pop()
        offset = self.arena.allocate(model.nbytes)
        entry = Resident(model.key, offset, model.nbytes, tensor_views(self.arena.buffer, offset, model))
        entry.copy = self.loader.copy(model, offset, background)
        self.stack.append(entry)
        self.loads += 1
        return entry

    def room_keeping(self, keep: frozenset[str]) -> int:
        """Bytes a new model could have once every model above the topmost one in `keep` is popped."""
        floor = self.base
        for entry in self.stack:
            if entry.key in keep:
                floor = entry.offset + entry.nbytes
        return self.arena.capacity - floor

    def _pop(self) -> None:
        entry = self.stack.pop()
        entry.copy.wait()  # its bytes must not be overwritten while a copy still writes them
        self.arena.release(entry.offset)
        self.evictions += 1

