"""The host model cache: one shared-memory region per node holding models ready to copy to a device.

Each cached model is one contiguous byte range of the region: its canonical tensors (see
`engine/weights.py`) back to back, each 16-byte aligned, described by an offset table. Scaling a
model up is then a single large copy of that range into the device arena, after which the tensors
are views at known offsets. The region is filled once per model from safetensors; when it is full,
the least recently used model that no process has pinned (marked active) is evicted.

Every process of a node maps the same region. The index (which model sits where, which process
pinned it, when it was last used) is a small JSON file beside the region, read and written under an
exclusive `flock` on the region's file; a model is filled outside the lock, marked "loading" until
it is complete, so other processes wait for it instead of loading it twice.

Index file layout (`<region>.index.json`):
    {"models": {key: {"offset", "nbytes", "dtype", "tensors": [[name, offset, shape], ...],
                      "ready": bool, "loader_pid", "last_used"}},
     "pins": {key: [pid, ...]}, "evictions": int}
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from aegaeon.memory.arena import align, dtype_size
from aegaeon.memory.shm import SHM_FILE_MODE, SharedRegion

INDEX_SUFFIX = ".index.json"
# How often a process waiting for another one's fill looks at the index again.
FILL_POLL_S = 0.01


class ModelCacheFullError(RuntimeError):
    """A model cannot be placed in the host model cache."""


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor of a cached model lives, relative to the model's first byte."""

    name: str
    offset: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CachedModel:
    """One model in the cache: a contiguous byte range and its offset table."""

    key: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    tensors: tuple[TensorSlot, ...]


def plan_layout(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> tuple[tuple[TensorSlot, ...], int]:
    """Aligned offsets of `shapes` packed back to back, and the total bytes."""
    slots, offset = [], 0
    for name, shape in shapes.items():
        slots.append(TensorSlot(name, offset, tuple(shape)))
        offset += align(math.prod(shape) * dtype_size(dtype))
    return tuple(slots), offset


def tensor_views(buffer: torch.Tensor, base: int, model: CachedModel) -> dict[str, torch.Tensor]:
    """The model's tensors as views into `buffer` (uint8), the model's first byte at `base`."""
    size = dtype_size(model.dtype)
    views = {}
    for slot in model.tensors:
        start = base + slot.offset
        raw = buffer[start : start + math.prod(slot.shape) * size]
        views[slot.name] = raw.view(model.dtype).view(slot.shape)
    return views


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ModelCacheStats:
    capacity: int
    used: int
    models: int
    evictions: int


class HostModelCache:
    """Models laid out contiguously in one shared-memory region of a node."""

    def __init__(self, region: SharedRegion):
        self.region = region
        self.index_path = region.path.with_name(region.path.name + INDEX_SUFFIX)

    @classmethod
    def create(cls, directory: str | Path, nbytes: int, name: str | None = None) -> HostModelCache:
        """A new, empty cache of `nbytes`; page-locked when CUDA is present."""
        name = name or f"aegaeon-models-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        region = SharedRegion.create(directory, name, align(nbytes))
        region.pin()
        cache = cls(region)
        descriptor = os.open(cache.index_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SHM_FILE_MODE)
        with os.fdopen(descriptor, "w") as index_file:
            json.dump({"models": {}, "pins": {}, "evictions": 0}, index_file)
        return cache

    @classmethod
    def attach(cls, directory: str | Path, name: str) -> HostModelCache:
        region = SharedRegion.attach(directory, name)
        region.pin()
        return cls(region)

    @property
    def name(self) -> str:
        return self.region.path.name

    @property
    def buffer(self) -> torch.Tensor:
        """The whole region as uint8."""
        return self.region.tensor

    # -- the index, under the node-wide lock ---------------------------------------------------------

    @contextmanager
    def _index(self) -> Iterator[dict]:
        with open(self.region.path, "rb") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                index = json.loads(self.index_path.read_text())
                yield index
                temporary = self.index_path.with_suffix(f".{os.getpid()}.tmp")
                descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SHM_FILE_MODE)
                with os.fdopen(descriptor, "w") as index_file:
                    json.dump(index, index_file)
                os.replace(temporary, self.index_path)
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    @staticmethod
    def _record(key: str, entry: dict) -> CachedModel:
        return CachedModel(
            key=key,
            offset=entry["offset"],
            nbytes=entry["nbytes"],
            dtype=getattr(torch, entry["dtype"]),
            tensors=tuple(TensorSlot(name, offset, tuple(shape)) for name, offset, shape in entry["tensors"]),
        )

    def get(self, key: str) -> CachedModel | None:
        """The cached model under `key` if it is fully loaded (marks it used)."""
        with self._index() as index:
            entry = index["models"].get(key)
            if entry is None or not entry["ready"]:
                return None
            entry["last_used"] = time.time()
            return self._record(key, entry)

    def stats(self) -> ModelCacheStats:
        with self._index() as index:
            used = sum(entry["nbytes"] for entry in index["models"].values())
            return ModelCacheStats(self.region.nbytes, used, len(index["models"]), index["evictions"])

    def pin(self, key: str) -> None:
        """Mark `key` active in this process: it is not evicted until unpinned (or this process dies)."""
        with self._index() as index:
            pids = index["pins"].setdefault(key, [])
            pids.append(os.getpid())

    def unpin(self, key: str) -> None:
        try:
            with self._index() as index:
                pids = index["pins"].get(key, [])
                if os.getpid() in pids:
                    pids.remove(os.getpid())
                if not pids:
                    index["pins"].pop(key, None)
        except FileNotFoundError:
            pass  # the cache is already gone (closed by its owner): nothing is pinned any more

    # -- filling -------------------------------------------------------------------------------------

    def load(
        self,
        key: str,
        shapes: dict[str, tuple[int, ...]],
        dtype: torch.dtype,
        read_state,
        progress: bool = True,
    ) -> CachedModel:
        """The model under `key`, filled from `read_state()` (name -> tensor) if it is not cached yet.

        `shapes` is the model's canonical layout, known before reading; if another process is
        filling the same key, this waits for it instead of reading the checkpoint again.
        """
        slots, nbytes = plan_layout(shapes, dtype)
        if nbytes > self.region.nbytes:
            raise ModelCacheFullError(
                f"model {key} needs {nbytes} bytes but the host model cache holds {self.region.nbytes} "
                "(raise host_model_cache_bytes)"
            )
        while True:
            with self._index() as index:
                entry = index["models"].get(key)
                if entry is not None and entry["ready"]:
                    entry["last_used"] = time.time()
                    return self._record(key, entry)
                if entry is not None and _pid_alive(entry["loader_pid"]):
                    pass  # another process is filling it: wait below, outside the lock
                else:
                    index["models"].pop(key, None)  # a filler that died leaves a stale reservation
                    offset = self._place(index, nbytes, key)
                    index["models"][key] = {
                        "offset": offset,
                        "nbytes": nbytes,
                        "dtype": _dtype_name(dtype),
                        "tensors": [[slot.name, slot.offset, list(slot.shape)] for slot in slots],
                        "ready": False,
                        "loader_pid": os.getpid(),
                        "last_used": time.time(),
                    }
                    model = self._record(key, index["models"][key])
                    break
            time.sleep(FILL_POLL_S)
        try:
            self._fill(model, read_state, progress)
        except BaseException:
            with self._index() as index:
                index["models"].pop(key, None)
            raise
        with self._index() as index:
            index["models"][key]["ready"] = True
        return model

    def _place(self, index: dict, nbytes: int, key: str) -> int:
        """First-fit offset for `nbytes`, evicting least recently used unpinned models until one fits."""
        while True:
            offset = self._first_fit(index["models"].values(), nbytes)
            if offset is not None:
                return offset
            pinned = {k for k, pids in index["pins"].items() if any(_pid_alive(pid) for pid in pids)}
            evictable = [
                (entry["last_used"], k)
                for k, entry in index["models"].items()
                if entry["ready"] and k not in pinned
            ]
            if not evictable:
                raise ModelCacheFullError(
                    f"no room for model {key} ({nbytes} bytes) in the host model cache "
                    f"({self.region.nbytes} bytes): every cached model is active "
                    "(raise host_model_cache_bytes)"
                )
            del index["models"][min(evictable)[1]]
            index["evictions"] += 1

    def _first_fit(self, entries, nbytes: int) -> int | None:
        cursor = 0
        for entry in sorted(entries, key=lambda e: e["offset"]):
            if entry["offset"] - cursor >= nbytes:
                return cursor
            cursor = max(cursor, entry["offset"] + entry["nbytes"])
        return cursor if self.region.nbytes - cursor >= nbytes else None

    def _fill(self, model: CachedModel, read_state, progress: bool) -> None:
        views = tensor_views(self.buffer, model.offset, model)
        state = read_state()
        bar = tqdm(
            total=model.nbytes,
            unit="B",
            unit_scale=True,
            desc=f"caching {Path(model.key.split('@')[0]).name}",
            disable=not progress or None,
            leave=False,
        )
        with bar:
            for name, view in views.items():
                if name not in state:
                    raise ValueError(f"model {model.key} has no tensor {name!r}")
                view.copy_(state.pop(name))
                bar.update(view.numel() * view.element_size())

    def close(self) -> None:
        """Unmap; the creating process also removes the region and its index."""
        if self.region.owner:
            self.index_path.unlink(missing_ok=True)
        self.region.close()
