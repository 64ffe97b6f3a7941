"""Which models an engine serves, which one is active on the device, and switching between them.

Every model is registered once (`ServedModel`: architecture, tokenizer, runner, batcher) and its
weights are pinned in the node's host model cache. A switch points the target's runner at weights in
the device arena (copied there from the host cache unless still resident) and at the arena's KV
region, laid out for its block shape: it builds nothing.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from aegaeon.config import EngineConfig, MemoryConfig
from aegaeon.engine.architecture import Architecture
from aegaeon.engine.batcher import ContinuousBatcher
from aegaeon.engine.kv_cache import BLOCK_SIZE, BlockAllocator, kv_block_bytes, kv_block_shape
from aegaeon.engine.runner import ModelRunner
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.engine.weights import ModelWeights, canonical_shapes, load_state, resolve_model_dir
from aegaeon.errors import InvalidRequest, ModelNotFound
from aegaeon.memory.arena import DeviceArena, align
from aegaeon.memory.copies import CopyStream
from aegaeon.memory.kv_pool import KVShape
from aegaeon.memory.loader import ModelLoader, ResidentModels
from aegaeon.memory.model_cache import CachedModel, HostModelCache, plan_layout
from aegaeon.memory.placement import slot_size

# The arena of a CPU engine holds the KV region and this many slots for its largest model: the
# active one and a prefetched next one.
DEFAULT_RESIDENT_MODELS = 2


@dataclass(frozen=True)
class SwitchTiming:
    """Where the time of one switch went, in seconds; the load phase ends when its copy has ended."""

    model: str
    drain_s: float  # swapping the previous model's KV out and waiting for outstanding moves
    load_s: float  # making room in the arena and copying the weights in (0 when resident)
    bind_s: float  # pointing the runner at the weights and the KV region
    loaded: bool  # whether weights were copied (False: the model was resident)


@dataclass
class ServedModel:
    """A model the engine can run; all of it is built once and reused across switches."""

    name: str
    model_dir: Path
    arch: Architecture
    tokenizer: Tokenizer
    eos_token_ids: frozenset[int]
    cache_key: str  # its key in the host model cache
    cached: CachedModel  # its place there
    weight_bytes: int
    num_blocks: int  # KV blocks of this model's shape the arena's KV region holds
    max_model_len: int
    runner: ModelRunner
    batcher: ContinuousBatcher
    kv_shape: KVShape


def weight_bytes(arch: Architecture, dtype: torch.dtype) -> int:
    """Bytes of a model's weights as the host model cache and the arena lay them out."""
    return plan_layout(canonical_shapes(arch), dtype)[1]


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
    ):
        self.device, self.dtype, self.config = device, dtype, config
        kv_bytes = align(config.kv_cache_bytes)
        specs = {name: self._describe(name, path, kv_bytes) for name, path in models.items()}
        largest = max(nbytes for _, _, nbytes in specs.values())
        if model_cache is None:  # an engine on its own: a private cache just large enough
            total = sum(nbytes for _, _, nbytes in specs.values())
            model_cache = HostModelCache.create(memory.shm_dir, memory.host_model_cache_bytes or total)
            weakref.finalize(self, model_cache.close)
        self.model_cache = model_cache
        self._unpins: dict[str, weakref.finalize] = {}  # by model name: releases its host cache pin
        self.models: dict[str, ServedModel] = {
            name: self._register(name, model_dir, arch, kv_bytes, progress)
            for name, (model_dir, arch, _) in specs.items()
        }
        self.arena = DeviceArena.for_device(
            device, memory, cpu_bytes=kv_bytes + DEFAULT_RESIDENT_MODELS * slot_size(largest)
        )
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
        self.active: ServedModel | None = None
        self.switches = 0
        self.last_switch: SwitchTiming | None = None

    def _describe(self, name: str, path: str | Path, kv_bytes: int) -> tuple[Path, Architecture, int]:
        model_dir = resolve_model_dir(path)
        arch = Architecture.from_pretrained(model_dir)
        if kv_bytes // kv_block_bytes(arch, self.dtype) < 1:
            raise ValueError(
                f"kv_cache_bytes={self.config.kv_cache_bytes} holds no KV block of model {name} "
                f"({kv_block_bytes(arch, self.dtype)} bytes each)"
            )
        return model_dir, arch, weight_bytes(arch, self.dtype)

    def _register(
        self, name: str, model_dir: Path, arch: Architecture, kv_bytes: int, progress: bool
    ) -> ServedModel:
        tokenizer = Tokenizer.from_pretrained(model_dir)
        cache_key = f"{model_dir.resolve()}@{str(self.dtype).removeprefix('torch.')}"
        cached = self.model_cache.load(
            cache_key,
            canonical_shapes(arch),
            self.dtype,
            lambda: load_state(model_dir, arch, self.dtype),
            progress,
        )
        # Pinned while this engine lives, so the cache never evicts or moves a model it may switch
        # to, and a switch needs no look-up in the cache's index.
        self.model_cache.pin(cache_key)
        self._unpins[name] = weakref.finalize(self, self.model_cache.unpin, cache_key)
        num_blocks = kv_bytes // kv_block_bytes(arch, self.dtype)
        max_model_len = min(self.config.max_model_len or arch.max_position, arch.max_position)
        return ServedModel(
            name=name,
            model_dir=model_dir,
            arch=arch,
            tokenizer=tokenizer,
            eos_token_ids=frozenset(arch.eos_token_ids) | tokenizer.eos_token_ids,
            cache_key=cache_key,
            cached=cached,
            weight_bytes=cached.nbytes,
            num_blocks=num_blocks,
            max_model_len=min(max_model_len, num_blocks * BLOCK_SIZE),
            runner=ModelRunner(arch, self.device, self.dtype),
            batcher=ContinuousBatcher(
                BlockAllocator(num_blocks), self.config.max_num_seqs, self.config.max_num_batched_tokens
            ),
            kv_shape=KVShape(arch.num_layers, arch.num_kv_heads, arch.head_dim, self.dtype),
        )

    def register(self, name: str, path: str | Path, progress: bool = False) -> ServedModel:
        """Serve one more model: its weights are loaded into the host model cache and pinned there."""
        if name in self.models:
            raise ValueError(f"a model called {name!r} is served already")
        model_dir, arch, nbytes = self._describe(name, path, self.kv_bytes)
        if nbytes > self.residents.slot_bytes:
            raise ValueError(
                f"model {name} needs {nbytes} bytes but the arena's weight slots hold "
                f"{self.residents.slot_bytes} (sized for the largest model at start)"
            )
        self.models[name] = self._register(name, model_dir, arch, self.kv_bytes, progress)
        return self.models[name]

    def unregister(self, name: str) -> None:
        """Stop serving `name` (it has no requests left): it stops being active and its pin is released.

        Its weights stay in the arena and the host cache until evicted like any unused model's.
        """
        served = self.model(name)
        if served is self.active:
            served.runner.bind(None, None)
            self.active = None
        self._unpins.pop(name)()
        del self.models[name]

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
        drained = time.perf_counter()
        loads = self.residents.loads
        resident = self.residents.use(target.cached)
        # The load phase ends when the copy has, not when it was enqueued (CUDA copies are async).
        resident.copy.synchronize()
        loaded = time.perf_counter()
        kv = self.arena.view(self.kv_offset, (target.num_blocks, *kv_block_shape(target.arch)), self.dtype)
        target.runner.bind(ModelWeights.from_state(target.arch, resident.tensors), kv)
        if previous is not None:
            previous.runner.bind(None, None)
        self.active = target
        self.switches += 1
        self.last_switch = SwitchTiming(
            target.name,
            drain_s=drained - start,
            load_s=loaded - drained,
            bind_s=time.perf_counter() - loaded,
            loaded=self.residents.loads > loads,
        )

    def prefetch(self, name: str) -> bool:
        """Start copying `name`'s weights into the arena beside the active model; False if no room."""
        target = self.model(name)
        if self.residents.get(target.cache_key) is not None:
            return True
        keep = frozenset({self.active.cache_key}) if self.active is not None else frozenset()
        if self.residents.room_keeping(keep) < target.weight_bytes:
            return False
        self.residents.load(target.cached, keep, background=True)
        return True

    def is_resident(self, name: str) -> bool:
        """Whether `name`'s weights are in the arena (a switch to it copies nothing)."""
        return self.residents.get(self.model(name).cache_key) is not None
