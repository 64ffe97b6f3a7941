"""The host model cache: one shared-memory region per node holding models ready to copy to a device.

Each cached model is one contiguous byte range of the region: its canonical tensors (see
`engine/weights.py`) back to back, each 16-byte aligned, described by an offset table. Scaling a
model up is then a single large copy of that range into the device arena, after which the tensors
are views at known offsets. A model is filled from safetensors when an engine needs it (`acquire`);
when the region is full, the least recently used model that no process has pinned is evicted, and a
model evicted is simply read from disk again the next time it is needed. Engines pin a model only
while it is active on their device or being copied there, so the cache holds what memory allows
of a node's models, not all of them. Its used bytes never exceed its size: with every model pinned,
`acquire` waits for a pin to be released, then fails.

Every process of a node maps the same region. The index (which model sits where, which process
pinned it, when it was last used) is a small JSON file beside the region, read and written under an
exclusive `flock` on the region's file; a model is filled outside the lock, marked "loading" until
it is complete, so other processes wait for it instead of loading it twice.

Index file layout (`<region>.index.json`), small because every switch reads and writes it (pins):
    {"models": {key: {"offset", "nbytes", "dtype", "ready": bool, "loader_pid", "last_used"}},
     "pins": {key: [pid, ...]}, "evictions": int, "disk_loads": int, "loaded_bytes": int}
Offset tables (`<region>.layouts.json`), written when a model is first placed (a key's layout never
changes: the key names the checkpoint and the dtype) and read once per process:
    {key: [[name, offset, shape], ...]}
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from aegaeon.config import MODEL_IN_HOST, MODEL_LOADING
from aegaeon.memory.arena import align, dtype_size
from aegaeon.memory.shm import SHM_FILE_MODE, SharedRegion

logger = logging.getLogger(__name__)

INDEX_SUFFIX = ".index.json"
LAYOUTS_SUFFIX = ".layouts.json"
# How often a process waiting for another one's fill (or for room) looks at the index again.
FILL_POLL_S = 0.01
# A load from disk logs its progress this often.
LOAD_LOG_INTERVAL_S = 5.0


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


def cache_key(model_dir: Path, dtype: torch.dtype) -> str:
    """The key a model's weights have in the host model cache: its directory and dtype."""
    return f"{Path(model_dir).resolve()}@{_dtype_name(dtype)}"


# Fills a model's byte range (uint8, laid out as the CachedModel says), calling the third argument
# with the bytes written as it goes.
Fill = Callable[[torch.Tensor, "CachedModel", Callable[[int], None]], None]


def _write_json(path: Path, value: dict) -> None:
    """Replace `path` by `value` atomically (readers never see half a file)."""
    temporary = path.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SHM_FILE_MODE)
    with os.fdopen(descriptor, "w") as file:
        json.dump(value, file)
    os.replace(temporary, path)


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
    disk_loads: int  # models filled from disk, in all
    loaded_bytes: int  # bytes they held


class HostModelCache:
    """Models laid out contiguously in one shared-memory region of a node."""

    def __init__(self, region: SharedRegion):
        self.region = region
        self.index_path = region.path.with_name(region.path.name + INDEX_SUFFIX)
        self.layouts_path = region.path.with_name(region.path.name + LAYOUTS_SUFFIX)
        self._layouts: dict[str, tuple[TensorSlot, ...]] = {}
        # Models this process (any thread) read from disk into the cache.
        self.fills = 0

    @classmethod
    def create(
        cls, directory: str | Path, nbytes: int, name: str | None = None, pin: bool = True
    ) -> HostModelCache:
        """A new, empty cache of `nbytes`; page-locked when CUDA is present, if `pin`."""
        name = name or f"aegaeon-models-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        region = SharedRegion.create(directory, name, align(nbytes))
        if pin:
            region.pin()
        cache = cls(region)
        descriptor = os.open(cache.index_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SHM_FILE_MODE)
        with os.fdopen(descriptor, "w") as index_file:
            json.dump(
                {"models": {}, "pins": {}, "evictions": 0, "disk_loads": 0, "loaded_bytes": 0}, index_file
            )
        descriptor = os.open(cache.layouts_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SHM_FILE_MODE)
        with os.fdopen(descriptor, "w") as layouts_file:
            json.dump({}, layouts_file)
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
    def _index(self, write: bool = True) -> Iterator[dict]:
        with open(self.region.path, "rb") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            try:
                index = json.loads(self.index_path.read_text())
                yield index
                if not write:
                    return
                _write_json(self.index_path, index)
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _record(self, key: str, entry: dict) -> CachedModel:
        """The model of an index entry (its offset table from this process's copy, or the file)."""
        if key not in self._layouts:
            layouts = json.loads(self.layouts_path.read_text())
            self._layouts[key] = tuple(
                TensorSlot(name, offset, tuple(shape)) for name, offset, shape in layouts[key]
            )
        return CachedModel(
            key=key,
            offset=entry["offset"],
            nbytes=entry["nbytes"],
            dtype=getattr(torch, entry["dtype"]),
            tensors=self._layouts[key],
        )

    def _save_layout(self, key: str, slots: tuple[TensorSlot, ...]) -> None:
        """Record `key`'s offset table for other processes (the index lock is held)."""
        self._layouts[key] = slots
        layouts = json.loads(self.layouts_path.read_text())
        if key in layouts:
            return
        layouts[key] = [[slot.name, slot.offset, list(slot.shape)] for slot in slots]
        _write_json(self.layouts_path, layouts)

    def get(self, key: str) -> CachedModel | None:
        """The cached model under `key` if it is fully loaded (marks it used)."""
        with self._index() as index:
            entry = index["models"].get(key)
            if entry is None or not entry["ready"]:
                return None
            entry["last_used"] = time.time()
            return self._record(key, entry)

    def stats(self) -> ModelCacheStats:
        with self._index(write=False) as index:
            used = sum(entry["nbytes"] for entry in index["models"].values())
            return ModelCacheStats(
                self.region.nbytes,
                used,
                len(index["models"]),
                index["evictions"],
                index["disk_loads"],
                index["loaded_bytes"],
            )

    def state(self, key: str) -> str | None:
        """`"host"` when the model under `key` is cached, `"loading"` while it is being filled, else None."""
        with self._index(write=False) as index:
            entry = index["models"].get(key)
            if entry is None:
                return None
            if entry["ready"]:
                return MODEL_IN_HOST
            return MODEL_LOADING if _pid_alive(entry["loader_pid"]) else None

    def pin(self, key: str) -> CachedModel | None:
        """Mark the cached model under `key` active in this process, so it is not evicted until
        unpinned (or this process dies); None (nothing pinned) if it is not cached."""
        with self._index() as index:
            entry = index["models"].get(key)
            if entry is None or not entry["ready"]:
                return None
            entry["last_used"] = time.time()
            index["pins"].setdefault(key, []).append(os.getpid())
            return self._record(key, entry)

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

    def acquire(
        self,
        key: str,
        shapes: dict[str, tuple[int, ...]],
        dtype: torch.dtype,
        fill: Fill,
        progress: bool = True,
        pin: bool = True,
        wait_s: float = 0.0,
        evict: bool = True,
    ) -> CachedModel | None:
        """The model under `key`, filled by `fill` if it is not cached yet; pinned unless `pin` is False.

        `shapes` is the model's canonical layout, known before reading. If another process (or
        thread) is filling the same key, this waits for it instead of reading the checkpoint again.
        If every cached model is pinned and none can make room, this waits up to `wait_s` seconds
        for a pin to be released, then raises ModelCacheFullError. With `evict` False it fills only
        free room, evicting nothing, and returns None when there is none (warming the cache).
        """
        slots, nbytes = plan_layout(shapes, dtype)
        if nbytes > self.region.nbytes:
            raise ModelCacheFullError(
                f"model {key} needs {nbytes} bytes but the host model cache holds {self.region.nbytes} "
                "(raise host_model_cache_bytes)"
            )
        deadline = time.monotonic() + wait_s
        while True:
            with self._index() as index:
                entry = index["models"].get(key)
                if entry is not None and entry["ready"]:
                    entry["last_used"] = time.time()
                    if pin:
                        index["pins"].setdefault(key, []).append(os.getpid())
                    return self._record(key, entry)
                if entry is None or not _pid_alive(entry["loader_pid"]):
                    index["models"].pop(key, None)  # a filler that died leaves a stale reservation
                    offset = (
                        self._place(index, nbytes)
                        if evict
                        else self._first_fit(index["models"].values(), nbytes)
                    )
                    if offset is None and not evict:
                        return None
                    if offset is not None:
                        index["models"][key] = {
                            "offset": offset,
                            "nbytes": nbytes,
                            "dtype": _dtype_name(dtype),
                            "ready": False,
                            "loader_pid": os.getpid(),
                            "last_used": time.time(),
                        }
                        self._save_layout(key, slots)
                        model = self._record(key, index["models"][key])
                        break
                    if time.monotonic() >= deadline:
                        raise ModelCacheFullError(
                            f"no room for model {key} ({nbytes} bytes) in the host model cache "
                            f"({self.region.nbytes} bytes): every cached model is active or being "
                            "prefetched (raise host_model_cache_bytes)"
                        )
                # else another process (or thread) is filling it: wait below, outside the lock
            time.sleep(FILL_POLL_S)
        try:
            self._fill(model, fill, progress)
        except BaseException:
            with self._index() as index:
                index["models"].pop(key, None)
            raise
        self.fills += 1
        with self._index() as index:
            index["models"][key]["ready"] = True
            index["disk_loads"] += 1
            index["loaded_bytes"] += model.nbytes
            if pin:
                index["pins"].setdefault(key, []).append(os.getpid())
        return model

    def _place(self, index: dict, nbytes: int) -> int | None:
        """First-fit offset for `nbytes`, evicting least recently used unpinned models until one
        fits; None if the pinned (or still loading) models leave no room."""
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
                return None
            victim = min(evictable)[1]
            del index["models"][victim]
            index["pins"].pop(victim, None)  # pins of processes that are gone
            index["evictions"] += 1

    def _first_fit(self, entries, nbytes: int) -> int | None:
        cursor = 0
        for entry in sorted(entries, key=lambda e: e["offset"]):
            if entry["offset"] - cursor >= nbytes:
                return cursor
            cursor = max(cursor, entry["offset"] + entry["nbytes"])
        return cursor if self.region.nbytes - cursor >= nbytes else None

    def _fill(self, model: CachedModel, fill: Fill, progress: bool) -> None:
        name = Path(model.key.split("@")[0]).name
        bar = tqdm(
            total=model.nbytes,
            unit="B",
            unit_scale=True,
            desc=f"caching {name}",
            disable=not progress or None,
            leave=False,
        )
        lock = threading.Lock()
        start = time.perf_counter()
        done, logged = 0, start

        def advance(nbytes: int) -> None:  # called from the reading threads
            nonlocal done, logged
            with lock:
                done += nbytes
                bar.update(nbytes)
                now = time.perf_counter()
                if now - logged >= LOAD_LOG_INTERVAL_S:
                    logged = now
                    logger.info("loading %s from disk: %d of %d MiB", name, done >> 20, model.nbytes >> 20)

        logger.info("loading %s into the host model cache (%d MiB)", name, model.nbytes >> 20)
        with bar:
            fill(self.buffer[model.offset : model.offset + model.nbytes], model, advance)
        seconds = time.perf_counter() - start
        logger.info(
            "loaded %s into the host model cache: %d MiB in %.2f s (%.2f GB/s)",
            name,
            model.nbytes >> 20,
            seconds,
            model.nbytes / max(seconds, 1e-9) / 1e9,
        )

    def close(self) -> None:
        """Unmap; the creating process also removes the region, its index and offset tables."""
        if self.region.owner:
            self.index_path.unlink(missing_ok=True)
            self.layouts_path.unlink(missing_ok=True)
        self.region.close()
