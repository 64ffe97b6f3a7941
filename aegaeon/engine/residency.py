"""Which models an engine serves, which one is active on the device, and switching between them.

Every model is registered once (`ServedModel`: architecture, tokenizer, runner, batcher). A switch
points the target's runner at weights in the device arena and at the arena's KV region, laid out for
its block shape: it builds nothing. Weights come down the tiers: resident in the arena, else copied
there from the node's host model cache, else first read from disk into that cache (the switch, and
so the first token of the requests waiting for it, waits for the read). The engine pins a model in
the host cache only while it is active here or being copied into the arena, so the cache may hold
fewer models than the node serves; a prefetch of a model the host cache lacks starts its disk read
in the background instead, and copies it once it is there.

Under tensor parallelism each rank's engine has its own Residency holding its shard of every model
(engine/parallel/shards.py): the host model cache keys shards by rank and group size, so a switch
copies only this rank's part, and every rank's KV region holds its own heads.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from aegaeon.config import DEFAULT_KV_CACHE_BYTES, RESIDENT_MODELS_ON_DEVICE, EngineConfig, MemoryConfig
from aegaeon.engine.architecture import Architecture
from aegaeon.engine.batcher import ContinuousBatcher
from aegaeon.engine.kv_cache import BLOCK_SIZE, BlockAllocator, kv_block_bytes, kv_block_shape
from aegaeon.engine.parallel.group import RankGroup
from aegaeon.engine.parallel.shards import (
    WHOLE_MODEL,
    Shard,
    rank_architecture,
    read_shard,
    shard_shapes,
)
from aegaeon.engine.runner import ModelRunner
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.engine.weights import ModelWeights, canonical_shapes, checkpoint_pieces, resolve_model_dir
from aegaeon.errors import InvalidRequest, ModelNotFound
from aegaeon.memory.arena import DeviceArena, align
from aegaeon.memory.checkpoint import read_pieces
from aegaeon.memory.copies import CopyStream
from aegaeon.memory.kv_pool import KVShape
from aegaeon.memory.loader import ModelLoader, ResidentModels
from aegaeon.memory.model_cache import CachedModel, HostModelCache, cache_key, plan_layout
from aegaeon.memory.placement import slot_size
from aegaeon.memory.sizing import available_host_bytes, device_kv_bytes, host_sizes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwitchTiming:
    """Where the time of one switch went, in seconds; the load phase ends when its copy has ended."""

    model: str
    drain_s: float  # swapping the previous model's KV out and waiting for outstanding moves
    load_s: float  # making room in the arena and copying the weights in (0 when resident)
    bind_s: float  # pointing the runner at the weights and the KV region
    loaded: bool  # whether weights were copied (False: the model was resident)
    from_disk: bool = False  # whether they were first read from disk into the host model cache


@dataclass
class ServedModel:
    """A model the engine can run; all of it is built once and reused across switches."""

    name: str
    model_dir: Path
    arch: Architecture  # what this engine runs: the whole model, or under TP this rank's share
    tokenizer: Tokenizer
    eos_token_ids: frozenset[int]
    cache_key: str  # its key in the host model cache
    weight_bytes: int
    num_blocks: int  # KV blocks of this model's shape the arena's KV region holds
    max_model_len: int
    runner: ModelRunner
    batcher: ContinuousBatcher
    kv_shape: KVShape
    model_arch: Architecture  # the whole model (`arch` itself without TP)
    tensor_parallel_size: int = 1

    @property
    def shape_key(self) -> str:
        """What latency profiles are keyed by: the model's shape, and the ranks it runs on."""
        key = self.model_arch.shape_key
        return key if self.tensor_parallel_size == 1 else f"{key}-tp{self.tensor_parallel_size}"


def weight_bytes(arch: Architecture, dtype: torch.dtype, shard: Shard = WHOLE_MODEL) -> int:
    """Bytes of a model's weights (one rank's shard under TP) as the host model cache and the arena
    lay them out."""
    return plan_layout(shard_shapes(arch, shard), dtype)[1]


class Residency:
    """The registered models, the device arena holding their weights and KV, and the active model."""

    def __init__(
        self,
        models: Mapping[str, str | Path],
        device: torch.device,
        dtype: torch.dtype,
        config: EngineConfig,
        memory: MemoryConfig,
        model_cache: HostModelCache | None,
        progress: bool,
        group: RankGroup | None = None,
    ):
        self.device, self.dtype, self.config, self.memory = device, dtype, config, memory
        self.progress = progress
        self.group = group
        self.shard = group.shard if group is not None else WHOLE_MODEL
        specs = {name: self._describe(path) for name, path in models.items()}
        largest = max(nbytes for _, _, nbytes in specs.values())
        if model_cache is None:  # an engine on its own: a private cache, at most what its models need
            sizes = host_sizes(
                memory,
                available_host_bytes(memory.shm_dir),
                models_bytes=sum(nbytes for _, _, nbytes in specs.values()),
            )
            model_cache = HostModelCache.create(memory.shm_dir, sizes.model_cache_bytes)
            weakref.finalize(self, model_cache.close)
        self.model_cache = model_cache
        # The KV region: as set; else, on the CPU without an arena size, the CPU default (and the arena
        # is that plus two slots); else what the arena leaves beside two copies of the largest model.
        kv_setting = config.kv_cache_bytes
        if kv_setting is None and device.type != "cuda" and memory.cpu_arena_bytes is None:
            kv_setting = DEFAULT_KV_CACHE_BYTES
        self.arena = DeviceArena.for_device(
            device,
            memory,
            cpu_bytes=align(kv_setting or 0) + RESIDENT_MODELS_ON_DEVICE * slot_size(largest),
        )
        kv_bytes = (
            align(kv_setting) if kv_setting is not None else device_kv_bytes(self.arena.capacity, largest)
        )
        self.models: dict[str, ServedModel] = {
            name: self._register(name, model_dir, arch, kv_bytes)
            for name, (model_dir, arch, _) in specs.items()
        }
        self.kv_offset = self.arena.allocate(kv_bytes)
        self.kv_bytes = kv_bytes
        # Zeroed once, so a padded attention read of a never-written slot sees finite numbers.
        self.arena.buffer[self.kv_offset : self.kv_offset + kv_bytes].zero_()
        self.copies = CopyStream(device)
        self.residents = ResidentModels(
            self.arena,
            ModelLoader(self.arena, model_cache, self.copies, memory.load_chunk_bytes),
            largest=largest,
        )
        if self.residents.slots < 1:
            raise ValueError(
                f"the largest model needs {largest} bytes but the device arena leaves "
                f"{self.residents.capacity()} for weights after {kv_bytes} of KV "
                "(raise cpu_arena_bytes or device_memory_fraction, or lower kv_cache_bytes)"
            )
        # Warm the host cache: the models that fit in its free room are read now (and their
        # checkpoints checked), in order; the others when first needed.
        for served in self.models.values():
            self.model_cache.acquire(
                served.cache_key,
                self._shapes(served),
                dtype,
                self._fill(served),
                progress,
                pin=False,
                evict=False,
            )
        self.active: ServedModel | None = None
        self.switches = 0
        self.last_switch: SwitchTiming | None = None
        # Host cache keys this engine holds a pin on (one each), and disk reads started by prefetches.
        self._pins: set[str] = set()
        # Keys of models registered as pinned: kept in the host cache while this engine serves them.
        self._held: set[str] = set()
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch-read")
        self._reading: dict[str, Future] = {}
        weakref.finalize(self, self._reads.shutdown, wait=False, cancel_futures=True)
        weakref.finalize(self, _unpin_all, model_cache, self._pins)

    def _describe(self, path: str | Path) -> tuple[Path, Architecture, int]:
        model_dir = resolve_model_dir(path)
        arch = Architecture.from_pretrained(model_dir)
        rank_architecture(arch, self.shard.size)  # refuses a model whose heads do not split evenly
        nbytes = weight_bytes(arch, self.dtype, self.shard)
        # Read the checkpoint's headers now, so a missing or misshapen tensor fails the registration,
        # not the first request (the weights themselves are read when the model is first needed).
        checkpoint_pieces(model_dir, arch, self.dtype, plan_layout(canonical_shapes(arch), self.dtype)[0])
        return model_dir, arch, nbytes

    def _register(self, name: str, model_dir: Path, model_arch: Architecture, kv_bytes: int) -> ServedModel:
        arch = rank_architecture(model_arch, self.shard.size)
        if kv_bytes // kv_block_bytes(arch, self.dtype) < 1:
            raise ValueError(
                f"kv_cache_bytes={kv_bytes} holds no KV block of model {name} "
                f"({kv_block_bytes(arch, self.dtype)} bytes each)"
            )
        tokenizer = Tokenizer.from_pretrained(model_dir)
        num_blocks = kv_bytes // kv_block_bytes(arch, self.dtype)
        max_model_len = min(self.config.max_model_len or arch.max_position, arch.max_position)
        return ServedModel(
            name=name,
            model_dir=model_dir,
            arch=arch,
            tokenizer=tokenizer,
            eos_token_ids=frozenset(arch.eos_token_ids) | tokenizer.eos_token_ids,
            cache_key=cache_key(model_dir, self.dtype, self.shard.rank, self.shard.size),
            weight_bytes=weight_bytes(model_arch, self.dtype, self.shard),
            num_blocks=num_blocks,
            max_model_len=min(max_model_len, num_blocks * BLOCK_SIZE),
            runner=ModelRunner(arch, self.device, self.dtype, self.group),
            batcher=ContinuousBatcher(
                BlockAllocator(num_blocks), self.config.max_num_seqs, self.config.max_num_batched_tokens
            ),
            kv_shape=KVShape(arch.num_layers, arch.num_kv_heads, arch.head_dim, self.dtype),
            model_arch=model_arch,
            tensor_parallel_size=self.shard.size,
        )

    def register(self, name: str, path: str | Path, pinned: bool = False) -> ServedModel:
        """Serve one more model; its weights are read into the host model cache when first needed, or
        now if `pinned`, which keeps them there (never evicted) while this engine serves it."""
        if name in self.models:
            raise ValueError(f"a model called {name!r} is served already")
        model_dir, arch, nbytes = self._describe(path)
        if nbytes > self.residents.slot_bytes:
            raise ValueError(
                f"model {name} needs {nbytes} bytes but the arena's weight slots hold "
                f"{self.residents.slot_bytes} (sized for the largest model at start)"
            )
        self.models[name] = self._register(name, model_dir, arch, self.kv_bytes)
        if pinned:
            try:
                self.host_copy(name)
            except BaseException:
                del self.models[name]
                raise
            self._held.add(self.models[name].cache_key)
        return self.models[name]

    def unregister(self, name: str) -> None:
        """Stop serving `name` (it has no requests left): it stops being active and its pin is released.

        Its weights stay in the arena and the host cache until evicted like any unused model's.
        """
        served = self.model(name)
        if served is self.active:
            served.runner.bind(None, None)
            self.active = None
        del self.models[name]
        self._held.discard(served.cache_key)
        self._release_pins()

    # -- the host model cache ------------------------------------------------------------------------

    def _shapes(self, served: ServedModel) -> dict[str, tuple[int, ...]]:
        """The layout of `served`'s weights on this rank (the canonical state without TP)."""
        return shard_shapes(served.model_arch, self.shard)

    def _fill(self, served: ServedModel):
        """What reads `served`'s checkpoint (this rank's shard) from disk into the host model cache."""
        if self.shard.size > 1:
            return read_shard(served.model_dir, served.model_arch, self.shard, self.dtype)
        memory = self.memory

        def fill(entry: torch.Tensor, layout: CachedModel, progress: Callable[[int], None]) -> None:
            pieces = checkpoint_pieces(served.model_dir, served.model_arch, self.dtype, layout.tensors)
            read_pieces(pieces, entry, memory.disk_read_threads, memory.disk_read_chunk_bytes, progress)

        return fill

    def host_copy(self, name: str) -> CachedModel:
        """`name`'s weights in the host model cache, pinned by this engine: read from disk if they
        are not there (waiting for a read another engine started), waiting for room if need be."""
        served = self.model(name)
        key = served.cache_key
        if key in self._pins:
            cached = self.model_cache.get(key)  # pinned, so still there
            if cached is not None:
                return cached
            self._pins.discard(key)
        cached = self.model_cache.acquire(
            key,
            self._shapes(served),
            self.dtype,
            self._fill(served),
            self.progress,
            wait_s=self.memory.host_cache_wait_s,
        )
        self._pins.add(key)
        return cached

    def _release_pins(self) -> None:
        """Unpin what is neither active here nor being copied into the arena."""
        keep = self.residents.copying() | self._held
        if self.active is not None:
            keep.add(self.active.cache_key)
        for key in self._pins - keep:
            self.model_cache.unpin(key)
            self._pins.discard(key)

    def _read_in_background(self, served: ServedModel) -> None:
        """Start reading `served` from disk into the host cache off the decode path (unpinned)."""
        key = served.cache_key
        reading = self._reading.get(key)
        if reading is not None and not reading.done():
            return
        if self.model_cache.state(key) is not None:  # cached, or another engine is reading it
            return

        def read() -> None:
            self.model_cache.acquire(
                key, self._shapes(served), self.dtype, self._fill(served), False, pin=False
            )

        def report(future: Future) -> None:
            if not future.cancelled() and future.exception() is not None:
                logger.warning("prefetch read of %s failed: %s", served.name, future.exception())

        self._reading[key] = self._reads.submit(read)
        self._reading[key].add_done_callback(report)

    def model(self, name: str | None) -> ServedModel:
        """The model called `name`; None names the only one (or the active one of several)."""
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            if self.active is not None:
                return self.active
            raise InvalidRequest(
                f"several models are served ({', '.join(self.models)}): name one", param="model"
            )
        if name not in self.models:
            raise ModelNotFound(f"model {name!r} is not served here; served: {', '.join(self.models)}")
        return self.models[name]

    def switch_to(self, name: str, drain: Callable[[ServedModel], None]) -> None:
        """Make `name` active; `drain` first takes the previous model's KV off the device."""
        target = self.model(name)
        if target is self.active:
            return
        start = time.perf_counter()
        previous = self.active
        if previous is not None:
            drain(previous)
            previous.runner.bind(None, None)
            self.active = None
            # Released before the target is acquired: engines each waiting for room in the host cache
            # while holding their previous model would wait for each other.
            self._release_pins()
        drained = time.perf_counter()
        loads, fills = self.residents.loads, self.model_cache.fills
        resident = self.residents.touch(target.cache_key)
        if resident is None:
            resident = self.residents.use(self.host_copy(target.name))
        elif target.cache_key not in self._pins and self.model_cache.pin(target.cache_key) is not None:
            self._pins.add(target.cache_key)
        # The load phase ends when the copy has, not when it was enqueued (CUDA copies are async).
        resident.copy.synchronize()
        loaded = time.perf_counter()
        kv = self.arena.view(self.kv_offset, (target.num_blocks, *kv_block_shape(target.arch)), self.dtype)
        target.runner.bind(ModelWeights.from_state(target.arch, resident.tensors), kv)
        self.active = target
        self._release_pins()
        self.switches += 1
        self.last_switch = SwitchTiming(
            target.name,
            drain_s=drained - start,
            load_s=loaded - drained,
            bind_s=time.perf_counter() - loaded,
            loaded=self.residents.loads > loads,
            from_disk=self.model_cache.fills > fills,
        )

    def prefetch(self, name: str) -> bool:
        """Start copying `name`'s weights into the arena beside the active model; False if there is
        no room, or if its weights are not in the host cache yet (their disk read starts instead)."""
        target = self.model(name)
        if self.residents.get(target.cache_key) is not None:
            return True
        keep = frozenset({self.active.cache_key}) if self.active is not None else frozenset()
        if self.residents.room_keeping(keep) < target.weight_bytes:
            return False
        self._release_pins()
        cached = self.model_cache.pin(target.cache_key)
        if cached is None:
            self._read_in_background(target)
            return False
        self._pins.add(target.cache_key)
        self.residents.load(cached, keep, background=True)
        return True

    def is_resident(self, name: str) -> bool:
        """Whether `name`'s weights are in the arena (a switch to it copies nothing)."""
        return self.residents.get(self.model(name).cache_key) is not None


def _unpin_all(model_cache: HostModelCache, pins: set[str]) -> None:
    for key in pins:
        model_cache.unpin(key)
