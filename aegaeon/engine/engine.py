"""The engine of one device: requests in, tokens and text out, step by step, for one or many models.

Every model the engine may run is registered once (`ServedModel`: architecture, tokenizer, runner,
batcher) and its weights are cached in the node's host model cache. One model is *active* at a
time: `switch_to` points its runner at weights in the device arena (copied there from the host
cache unless still resident) and at the arena's KV region, laid out for its block shape. A switch
builds nothing: no module, no tensor outside the arena, no tokenizer.

KV of requests whose model is not active waits in the host KV pool (`swap_out` / `swap_in`); each
move is a batch of block copies ending in an event, and a step runs only the sequences whose KV has
landed. A single-model engine (`LLMEngine(PATH)`) is the same thing with one registered model.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from aegaeon.config import EngineConfig, MemoryConfig, default_model_name
from aegaeon.engine.architecture import Architecture
from aegaeon.engine.batcher import ContinuousBatcher, ScheduledStep
from aegaeon.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from aegaeon.engine.kv_cache import (
    BLOCK_SIZE,
    BlockAllocator,
    blocks_for_tokens,
    kv_block_bytes,
    kv_block_shape,
)
from aegaeon.engine.outputs import CompletionOutput, RequestOutput
from aegaeon.engine.prompt import PreparedPrompt, prepare_prompt, prompt_token_ids
from aegaeon.engine.runner import ModelRunner
from aegaeon.engine.sampler import TokenLogprobs
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.sequence import FinishReason, Sequence, SequenceStatus
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.engine.weights import (
    ModelWeights,
    canonical_shapes,
    load_state,
    parse_dtype,
    resolve_model_dir,
)
from aegaeon.memory.arena import DeviceArena, align
from aegaeon.memory.copies import Copy, CopyStream
from aegaeon.memory.kv_pool import HostKVPool, KVShape
from aegaeon.memory.loader import ModelLoader, ResidentModels
from aegaeon.memory.model_cache import CachedModel, HostModelCache, plan_layout

# The arena of a CPU engine holds the KV region and this many copies of its largest model: the
# active one and a prefetched next one.
DEFAULT_RESIDENT_MODELS = 2


@dataclass(frozen=True)
class SwitchTiming:
    """Where the time of one switch went, in seconds (host clock; CUDA copies may still be running)."""

    model: str
    drain_s: float  # swapping the previous model's KV out and waiting for outstanding moves
    load_s: float  # making room in the arena and copying the weights in (0 when resident)
    bind_s: float  # pointing the runner at the weights and the KV region
    loaded: bool  # whether weights were copied (False: the model was resident)

    @property
    def total_s(self) -> float:
        return self.drain_s + self.load_s + self.bind_s


@dataclass
class SequenceHandoff:
    """One sequence of a request moving between engines; its KV waits in the host KV pool."""

    index: int
    output_token_ids: list[int]
    logprobs: list[TokenLogprobs]
    host_blocks: list[int]
    generator_state: torch.Tensor | None
    finish_reason: str | None
    text: str


@dataclass
class RequestHandoff:
    """A request leaving one engine (a prefill instance) for another (a decode instance) of the node.

    Plain data, picklable: the KV itself stays in the node's shared host KV pool.
    """

    request_id: str
    model: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    seqs: list[SequenceHandoff]


@dataclass
class _Request:
    model: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]


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


class LLMEngine:
    """Continuous batching over a paged KV cache, for the active one of several models on one device."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        models: Mapping[str, str | Path] | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        config: EngineConfig | None = None,
        memory: MemoryConfig | None = None,
        model_cache: HostModelCache | None = None,
        kv_pool: HostKVPool | None = None,
        progress: bool = True,
    ):
        if (model is None) == (models is None):
            raise ValueError("pass either model=PATH or models={name: PATH, ...}")
        models = {default_model_name(str(model)): model} if model is not None else dict(models)
        if not models:
            raise ValueError("models is empty: name at least one model")
        self.config = config or EngineConfig()
        self.memory = memory or MemoryConfig()
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        self.kv_pool = kv_pool
        kv_bytes = align(self.config.kv_cache_bytes)

        specs = {name: self._describe(name, path, kv_bytes) for name, path in models.items()}
        largest = max(nbytes for _, _, nbytes in specs.values())
        if model_cache is None:  # an engine on its own: a private cache just large enough
            total = sum(nbytes for _, _, nbytes in specs.values())
            nbytes = self.memory.host_model_cache_bytes or total
            model_cache = HostModelCache.create(self.memory.shm_dir, nbytes)
            weakref.finalize(self, model_cache.close)
        self.model_cache = model_cache
        self.models: dict[str, ServedModel] = {}
        for name, (model_dir, arch, _) in specs.items():
            self.models[name] = self._register(name, model_dir, arch, kv_bytes, progress)

        self.arena = DeviceArena.for_device(
            self.device, self.memory, cpu_bytes=kv_bytes + DEFAULT_RESIDENT_MODELS * largest
        )
        self.kv_offset = self.arena.allocate(kv_bytes)
        self.kv_bytes = kv_bytes
        # Zeroed once, so a padded attention read of a never-written slot sees finite numbers.
        self.arena.buffer[self.kv_offset : self.kv_offset + kv_bytes].zero_()
        self.copies = CopyStream(self.device)
        self.residents = ResidentModels(
            self.arena,
            ModelLoader(self.arena, model_cache, self.copies, self.memory.load_chunk_bytes),
            largest=largest,
        )
        if largest > self.residents.capacity():
            raise ValueError(
                f"the largest model needs {largest} bytes but the device arena leaves "
                f"{self.residents.capacity()} for weights after {kv_bytes} of KV "
                "(raise cpu_arena_bytes or device_memory_fraction, or lower kv_cache_bytes)"
            )
        self.active: ServedModel | None = None
        self.switches = 0
        self.last_switch: SwitchTiming | None = None
        # KV copies not yet known complete, with what to release once they are.
        self._moves: list[tuple[Copy, Callable[[], None]]] = []
        self._requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        if len(self.models) == 1:
            self.switch_to(next(iter(self.models)))

    # -- models --------------------------------------------------------------------------------------

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
        shapes = canonical_shapes(arch)
        cache_key = f"{model_dir.resolve()}@{str(self.dtype).removeprefix('torch.')}"
        cached = self.model_cache.load(
            cache_key, shapes, self.dtype, lambda: load_state(model_dir, arch, self.dtype), progress
        )
        # Pinned while this engine lives, so the cache never evicts or moves a model it may switch
        # to, and a switch needs no look-up in the cache's index.
        self.model_cache.pin(cache_key)
        weakref.finalize(self, self.model_cache.unpin, cache_key)
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

    def _model(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            if self.active is not None:
                return self.active
            raise ValueError(f"several models are served ({', '.join(self.models)}): name one")
        if name not in self.models:
            raise KeyError(f"model {name!r} is not served here; served: {', '.join(self.models)}")
        return self.models[name]

    # The single-model view (what the offline API and its tests look at).
    @property
    def arch(self) -> Architecture:
        return self._model(None).arch

    @property
    def tokenizer(self) -> Tokenizer:
        return self._model(None).tokenizer

    @property
    def runner(self) -> ModelRunner:
        return self._model(None).runner

    @property
    def batcher(self) -> ContinuousBatcher:
        return self._model(None).batcher

    @property
    def max_model_len(self) -> int:
        return self._model(None).max_model_len

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._model(None).eos_token_ids

    # -- switching -----------------------------------------------------------------------------------

    def switch_to(self, name: str) -> None:
        """Make `name` the active model: the next steps run its requests.

        Sequences of the previous model still on the device are swapped out to the host KV pool
        (or, with no pool, preempted and recomputed later); outstanding KV moves finish first,
        because the KV region is about to be read with another block shape.
        """
        target = self._model(name)
        if target is self.active:
            return
        start = time.perf_counter()
        previous = self.active
        if previous is not None:
            for seq in list(previous.batcher.running):
                if self.kv_pool is not None:
                    self._swap_out_seq(previous, seq)
                else:
                    previous.batcher.preempt(seq)
        self._finish_moves()
        drained = time.perf_counter()
        loads = self.residents.loads
        resident = self.residents.use(target.cached)
        resident.copy.wait()
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
        target = self._model(name)
        if self.residents.get(target.cache_key) is not None:
            return True
        keep = frozenset({self.active.cache_key}) if self.active is not None else frozenset()
        if self.residents.room_keeping(keep) < target.weight_bytes:
            return False
        self.residents.load(target.cached, keep, background=True)
        return True

    def is_resident(self, name: str) -> bool:
        """Whether `name`'s weights are in the arena (a switch to it copies nothing)."""
        return self.residents.get(self._model(name).cache_key) is not None

    def model_cache_entry(self, model: ServedModel) -> CachedModel:
        """Where `model` sits in the host cache (pinned there while this engine lives: no lookup)."""
        return model.cached

    # -- KV swaps ------------------------------------------------------------------------------------

    def swap_out(self, request_id: str) -> None:
        """Move a request's KV from the device to the host KV pool; its model must be active."""
        request = self._request(request_id)
        served = self._active_for(request)
        for seq in request.seqs:
            if seq.status is SequenceStatus.RUNNING:
                self._swap_out_seq(served, seq)
        self._reap_moves()

    def swap_in(self, request_id: str) -> None:
        """Start moving a swapped-out request's KV back to the device; steps run it once it lands."""
        request = self._request(request_id)
        served = self._active_for(request)
        for seq in request.seqs:
            if seq.status is SequenceStatus.SWAPPED:
                self._reap_moves()
                blocks = served.batcher.swap_in(seq)
                pairs = [
                    (served.runner.kv_cache[block], self.kv_pool.view(handle, served.kv_shape))
                    for block, handle in zip(blocks, seq.host_blocks, strict=True)
                ]
                copy = self.copies.copy(pairs)
                host_blocks, seq.host_blocks = seq.host_blocks, []
                seq.kv_arrival = copy
                self._moves.append((copy, lambda blocks=host_blocks: self.kv_pool.free(blocks)))
        self._reap_moves()

    def _swap_out_seq(self, served: ServedModel, seq: Sequence) -> None:
        if self.kv_pool is None:
            raise RuntimeError("this engine has no host KV pool to swap to (pass kv_pool=...)")
        if seq.kv_arrival is not None:
            seq.kv_arrival.wait()
            seq.kv_arrival = None
        handles = self.kv_pool.allocate(served.kv_shape, len(seq.block_table))
        pairs = [
            (self.kv_pool.view(handle, served.kv_shape), served.runner.kv_cache[block])
            for handle, block in zip(handles, seq.block_table, strict=True)
        ]
        copy = self.copies.copy(pairs)
        blocks = served.batcher.swap_out(seq)
        seq.host_blocks = handles
        # The device blocks are reused only once the copy that reads them has completed.
        self._moves.append((copy, lambda: served.batcher.allocator.free(blocks)))

    def _active_for(self, request: _Request) -> ServedModel:
        served = self.models[request.model]
        if served is not self.active:
            raise RuntimeError(f"model {request.model} is not active: switch_to it before moving its KV")
        return served

    def _reap_moves(self) -> None:
        """Release what completed moves held."""
        pending = []
        for copy, release in self._moves:
            if copy.done():
                copy.wait()
                release()
            else:
                pending.append((copy, release))
        self._moves = pending

    def _finish_moves(self) -> None:
        for copy, release in self._moves:
            copy.synchronize()
            release()
        self._moves = []

    # -- requests ------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        model: str | None = None,
    ) -> None:
        """Queue a prompt (text, or token ids) for `model`; raises ValueError on bad input."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prepared = self.prepare_prompt(prompt, params, model)
        served = self.models[prepared.model]
        seqs = [
            self._new_sequence(served, request_id, index, prepared.token_ids, params, prepared.max_tokens)
            for index in range(params.n)
        ]
        for seq in seqs:
            served.batcher.add(seq)
        self._requests[request_id] = _Request(served.name, prepared.text, list(prepared.token_ids), seqs)

    def prepare_prompt(
        self, prompt: str | list[int], params: SamplingParams, model: str | None = None
    ) -> PreparedPrompt:
        """Tokenize and check a prompt for `model` (ValueError / KeyError saying what is wrong)."""
        served = self._model(model)
        return prepare_prompt(
            served.name, served.tokenizer, served.arch.vocab_size, served.max_model_len, prompt, params
        )

    def _new_sequence(
        self,
        served: ServedModel,
        request_id: str,
        index: int,
        token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
    ) -> Sequence:
        return Sequence(
            seq_id=next(self._seq_ids),
            request_id=request_id,
            index=index,
            prompt_token_ids=list(token_ids),
            params=params,
            max_tokens=max_tokens,
            detokenizer=IncrementalDetokenizer(served.tokenizer, token_ids, params.skip_special_tokens),
            stop_matcher=StopStringMatcher(params.stop, params.include_stop_str_in_output)
            if params.stop
            else None,
            generator=self._generator(params.seed, index),
        )

    def export_request(self, request_id: str) -> RequestHandoff:
        """Hand a request over to another engine: swapped out here, it leaves this engine entirely.

        Its host KV blocks now belong to the handoff; the receiving engine frees them.
        """
        request = self._request(request_id)
        batcher = self.models[request.model].batcher
        if self.models[request.model] is self.active:
            self.swap_out(request_id)
        self._finish_moves()  # the host copies must be complete before another engine reads them
        handoffs = []
        for seq in request.seqs:
            if not seq.finished:
                if seq.status is not SequenceStatus.SWAPPED:
                    raise RuntimeError(f"request {request_id} has a sequence without KV to hand over")
                batcher.swapped.remove(seq)
            handoffs.append(
                SequenceHandoff(
                    index=seq.index,
                    output_token_ids=list(seq.output_token_ids),
                    logprobs=list(seq.logprobs),
                    host_blocks=list(seq.host_blocks),
                    generator_state=seq.generator.get_state() if seq.generator is not None else None,
                    finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                    text=seq.text,
                )
            )
            seq.host_blocks = []
        del self._requests[request_id]
        first = request.seqs[0]
        return RequestHandoff(
            request_id,
            request.model,
            request.prompt,
            request.prompt_token_ids,
            first.params,
            first.max_tokens,
            handoffs,
        )

    def import_request(self, handoff: RequestHandoff) -> None:
        """Take over a request exported by another engine of the node; it waits swapped out.

        A sequence handed over without KV blocks waits to be recomputed (prompt plus its output so
        far, as after a preemption): how requests of a crashed instance resume.
        """
        served = self._model(handoff.model)
        if handoff.request_id in self._requests:
            raise ValueError(f"request id {handoff.request_id!r} is already in use")
        seqs = []
        for moved in handoff.seqs:
            seq = self._new_sequence(
                served,
                handoff.request_id,
                moved.index,
                handoff.prompt_token_ids,
                handoff.params,
                handoff.max_tokens,
            )
            if moved.generator_state is not None:
                seq.generator.set_state(moved.generator_state)
            # Replaying the tokens rebuilds the detokenizer's and stop matcher's state exactly.
            for token_id in moved.output_token_ids:
                seq.output_token_ids.append(token_id)
                delta = seq.detokenizer.add(token_id)
                if seq.stop_matcher is not None:
                    delta = seq.stop_matcher.feed(delta)[0]
                seq.text += delta
            seq.logprobs = list(moved.logprobs)
            if moved.finish_reason is not None:
                seq.text = moved.text  # a finished text may hold a released tail the replay does not
                seq.finish_reason = FinishReason(moved.finish_reason)
                seq.status = SequenceStatus.FINISHED
            elif moved.host_blocks:
                seq.host_blocks = list(moved.host_blocks)
                seq.status = SequenceStatus.SWAPPED
                served.batcher.swapped.append(seq)
            else:  # its KV was lost (an instance process died): recomputed from prompt and output so far
                served.batcher.add(seq)
            seqs.append(seq)
        self._requests[handoff.request_id] = _Request(
            served.name, handoff.prompt, list(handoff.prompt_token_ids), seqs
        )

    def on_device(self, request_id: str) -> bool:
        """Whether the request has sequences whose KV is on the device (running)."""
        return any(seq.status is SequenceStatus.RUNNING for seq in self._request(request_id).seqs)

    def _request(self, request_id: str) -> _Request:
        if request_id not in self._requests:
            raise KeyError(f"no unfinished request {request_id!r}")
        return self._requests[request_id]

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its sequences end with finish_reason "abort"."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        batcher = self.models[request.model].batcher
        for seq in request.seqs:
            if seq.finished:
                continue
            seq.finish_reason = FinishReason.ABORT
            if seq.host_blocks:
                self.kv_pool.free(seq.host_blocks)
                seq.host_blocks = []
            batcher.finish(seq)

    def next_token_logits(self, prompts: list[list[int]], model: str | None = None) -> torch.Tensor:
        """float32 logits `[len(prompts), vocab]` of the token after each prompt, prefilled together.

        For checking the model against a reference; it borrows KV blocks and returns them at once.
        """
        served = self._model(model)
        self.switch_to(served.name)
        seqs = []
        try:
            for prompt in prompts:
                _, token_ids = prompt_token_ids(served.tokenizer, served.arch.vocab_size, prompt)
                seq = self._new_sequence(served, "logits", 0, token_ids, SamplingParams(), max_tokens=1)
                seq.block_table = served.batcher.allocator.allocate(blocks_for_tokens(len(token_ids)))
                seqs.append(seq)
            return served.runner.logits(ScheduledStep(is_prefill=True, seqs=seqs))
        finally:
            for seq in seqs:
                served.batcher.allocator.free(seq.block_table)

    def has_unfinished_requests(self, model: str | None = None) -> bool:
        if model is None:
            return bool(self._requests)
        return any(request.model == model for request in self._requests.values())

    def requests_of(self, model: str) -> list[str]:
        """Ids of `model`'s unfinished requests, oldest first."""
        return [request_id for request_id, request in self._requests.items() if request.model == model]

    def step(self) -> list[RequestOutput]:
        """Run one forward pass of the active model; the outputs of every request it advanced."""
        served = self.active
        if served is None:
            raise RuntimeError("no model is active: switch_to one first")
        self._reap_moves()
        scheduled = served.batcher.schedule()
        if scheduled is None:
            return []
        scheduled = scheduled.only(self._landed(scheduled.seqs))
        sampled = served.runner.step(scheduled)
        touched: dict[str, None] = {}
        # A prompt prefilled in chunks samples (and appears in the outputs) with its last chunk only.
        seqs = scheduled.sampling
        for seq, token_id, logprobs in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
            self._append_token(served, seq, token_id, logprobs)
            if seq.finish_reason is not None:
                served.batcher.finish(seq)
            touched[seq.request_id] = None
        return [self._output(request_id) for request_id in touched]

    @staticmethod
    def _landed(seqs: list[Sequence]) -> list[Sequence]:
        """The sequences whose KV is on the device; waits for the first arrival if none has landed."""
        landed = [seq for seq in seqs if seq.kv_arrival is None or seq.kv_arrival.done()]
        if not landed:
            landed = [seqs[0]]
        for seq in landed:
            if seq.kv_arrival is not None:
                seq.kv_arrival.wait()
                seq.kv_arrival = None
        return landed

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        # Each of a request's n samples gets its own stream, so they differ yet stay reproducible.
        return torch.Generator(device=self.device).manual_seed(seed + index)

    def _append_token(
        self, served: ServedModel, seq: Sequence, token_id: int, logprobs: TokenLogprobs | None
    ) -> None:
        seq.output_token_ids.append(token_id)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        params = seq.params
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in served.eos_token_ids):
            self._finish(seq, FinishReason.STOP)
            return
        delta = seq.detokenizer.add(token_id)
        if seq.stop_matcher is not None:
            delta, stopped = seq.stop_matcher.feed(delta)
            seq.text += delta
            if stopped:  # the matcher already cut the text at the stop string
                seq.finish_reason = FinishReason.STOP
                return
        else:
            seq.text += delta
        if len(seq.output_token_ids) >= seq.max_tokens:
            self._finish(seq, FinishReason.LENGTH)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence for a reason other than a stop string: release any held-back text."""
        tail = seq.detokenizer.flush()
        if seq.stop_matcher is not None:
            tail = seq.stop_matcher.feed(tail)[0] + seq.stop_matcher.finish()
            if seq.stop_matcher.matched is not None:
                reason = FinishReason.STOP
        seq.text += tail
        seq.finish_reason = reason

    def _output(self, request_id: str) -> RequestOutput:
        request = self._requests[request_id]
        outputs = [
            CompletionOutput(
                index=seq.index,
                text=seq.text,
                token_ids=list(seq.output_token_ids),
                finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            )
            for seq in request.seqs
        ]
        finished = all(seq.finished for seq in request.seqs)
        if finished:
            del self._requests[request_id]
        return RequestOutput(request_id, request.prompt, request.prompt_token_ids, outputs, finished)
