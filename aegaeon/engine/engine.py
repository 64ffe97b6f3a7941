"""The engine of one device: requests in, new tokens and text out, step by step, for one or many models.

It composes what it holds: the registered models and the active one (`Residency`), the KV moves to
and from the host KV pool (`KVMover`), handoffs between engines (engine/handoff.py) and the output
post-processor (engine/postprocess.py). Each step returns, per request it advanced, only what is
new. A single-model engine (`LLMEngine(PATH)`) is the same thing with one registered model.

Under tensor parallelism every rank runs an engine over its shard (`group`), fed the same calls in
the same order by rank 0 (engine/parallel/lockstep.py); each step's sampled tokens are rank 0's.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

import torch

from aegaeon.config import EngineConfig, MemoryConfig, default_model_name
from aegaeon.engine import handoff
from aegaeon.engine.batcher import ScheduledStep
from aegaeon.engine.grammar import GrammarCompiler
from aegaeon.engine.handoff import RequestHandoff
from aegaeon.engine.kv_mover import KVMover
from aegaeon.engine.outputs import RequestDelta, SequenceDelta
from aegaeon.engine.parallel.group import RankGroup
from aegaeon.engine.postprocess import append_token, step_deltas
from aegaeon.engine.prompt import PreparedPrompt, prepare_prompt, prompt_token_ids
from aegaeon.engine.residency import Residency, ServedModel
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.sequence import FinishReason, Request, Sequence, SequenceStatus
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.engine.weights import parse_dtype
from aegaeon.memory.copies import CopyStream
from aegaeon.memory.kv_pool import HostKVPool
from aegaeon.memory.model_cache import HostModelCache
from aegaeon.scheduler.models import blocks_for_tokens


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
        group: RankGroup | None = None,
    ):
        if (model is None) == (models is None):
            raise ValueError("pass either model=PATH or models={name: PATH, ...}")
        models = {default_model_name(str(model)): model} if model is not None else dict(models)
        if not models:
            raise ValueError("models is empty: name at least one model")
        self.config = config or EngineConfig()
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        # A rank of a tensor-parallel group (None: the engine runs the whole model alone).
        self.group = group if group is not None and group.size > 1 else None
        self.residency = Residency(
            models,
            self.device,
            self.dtype,
            self.config,
            memory or MemoryConfig(),
            model_cache,
            progress,
            group,
        )
        self.models = self.residency.models
        # KV moves on their own stream, ahead of the weights' copies (a swap-in never waits for a prefetch).
        self.kv = KVMover(
            CopyStream(self.device, ahead_of=self.residency.copies), kv_pool, self.residency.shard
        )
        self._requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._grammar_compilers: dict[str, GrammarCompiler] = {}
        if len(self.models) == 1:
            self.switch_to(next(iter(self.models)))

    def model(self, name: str | None = None) -> ServedModel:
        """The model called `name`; None names the only one (or the active one of several)."""
        return self.residency.model(name)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model().tokenizer

    @property
    def active(self) -> ServedModel | None:
        return self.residency.active

    # -- models --------------------------------------------------------------------------------------

    def switch_to(self, name: str) -> None:
        """Make `name` the active model; the previous one's running KV goes to the host KV pool first."""
        self.residency.switch_to(name, self.kv.evict)

    def register(self, name: str, path: str | Path, pinned: bool = False) -> ServedModel:
        """Serve one more model, called `name`, from `path` (a local HF directory or a hub id);
        `pinned` keeps its weights in the host model cache while it is served."""
        return self.residency.register(name, path, pinned)

    def unregister(self, name: str) -> None:
        """Stop serving `name`; it must have no unfinished requests (drain it first)."""
        if self.has_unfinished_requests(name):
            raise RuntimeError(f"model {name} still has unfinished requests: drain it before removing it")
        self.residency.unregister(name)

    def prefetch(self, name: str) -> bool:
        """Start copying `name`'s weights into the arena beside the active model; False if no room."""
        return self.residency.prefetch(name)

    def is_resident(self, name: str) -> bool:
        return self.residency.is_resident(name)

    # -- KV ------------------------------------------------------------------------------------------

    def swap_out(self, *request_ids: str) -> None:
        """Take requests off the device, their KV to the host KV pool in one move, or dropped to be
        recomputed when the pool is full (so are sequences waiting to run); a running one's model
        must be active."""
        requests = [self._request(request_id) for request_id in request_ids]
        running: list[Sequence] = []
        for request in requests:
            batcher = self.models[request.model].batcher
            for seq in request.seqs:
                if seq.status is SequenceStatus.RUNNING:
                    self._active_for(request)
                    running.append(seq)
                elif seq.status is SequenceStatus.WAITING:
                    batcher.drop(seq)  # no KV on the device yet: it waits to be prefilled when placed again
        if running:
            self.kv.swap_out(self.active, running)
        self.kv.reap()

    def swap_in(self, *request_ids: str) -> list[str]:
        """Bring swapped-out requests back, their KV in one move (steps run each once it lands) or,
        dropped, recomputed by the next steps. The ids of those placed whole: not those with nothing
        swapped out, nor those the device had no room for (the rest of them stays swapped out)."""
        requests = [self._request(request_id) for request_id in request_ids]
        swapped = [
            [seq for seq in request.seqs if seq.status is SequenceStatus.SWAPPED] for request in requests
        ]
        for request, seqs in zip(requests, swapped, strict=True):
            if seqs:
                self._active_for(request)
        flat = [seq for seqs in swapped for seq in seqs]
        if not flat:
            return []
        placed = {seq for seq, ok in zip(flat, self.kv.swap_in(self.active, flat), strict=True) if ok}
        self.kv.reap()
        return [
            request_id
            for request_id, seqs in zip(request_ids, swapped, strict=True)
            if seqs and all(seq in placed for seq in seqs)
        ]

    def on_device(self, request_id: str) -> bool:
        """Whether the request has sequences whose KV is on the device (running)."""
        return any(seq.status is SequenceStatus.RUNNING for seq in self._request(request_id).seqs)

    def _active_for(self, request: Request) -> ServedModel:
        served = self.models[request.model]
        if served is not self.active:
            raise RuntimeError(f"model {request.model} is not active: switch_to it before moving its KV")
        return served

    # -- requests ------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        model: str | None = None,
    ) -> PreparedPrompt:
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
        self._requests[request_id] = Request(served.name, list(prepared.token_ids), seqs)
        return prepared

    def prepare_prompt(
        self, prompt: str | list[int], params: SamplingParams, model: str | None = None
    ) -> PreparedPrompt:
        """Tokenize and check a prompt for `model` (ValueError / KeyError saying what is wrong)."""
        served = self.model(model)
        return prepare_prompt(
            served.name, served.tokenizer, served.arch.vocab_size, served.max_model_len, prompt, params
        )

    def _new_sequence(
        self, served: ServedModel, request_id: str, index: int, token_ids: list[int], params, max_tokens: int
    ) -> Sequence:
        seq_id = next(self._seq_ids)
        tokenizer = served.tokenizer
        grammar = self._grammars(served).matcher(params.grammar) if params.grammar is not None else None
        return Sequence.start(
            seq_id,
            request_id,
            index,
            token_ids,
            params,
            max_tokens,
            tokenizer,
            self.device,
            grammar=grammar,
            eos_token_ids=served.eos_token_ids,
        )

    def _grammars(self, served: ServedModel) -> GrammarCompiler:
        """The model's grammar compiler (made on first use: its tokenizer takes llguidance a while)."""
        compiler = self._grammar_compilers.get(served.name)
        if compiler is None:
            compiler = GrammarCompiler(served.tokenizer, served.arch.vocab_size)
            self._grammar_compilers[served.name] = compiler
        return compiler

    def export_request(self, request_id: str) -> RequestHandoff:
        """Hand a request over to another engine: swapped out here (KV the host pool cannot hold is
        recomputed there), it leaves this engine entirely."""
        self.swap_out(request_id)
        request = self._request(request_id)
        self.kv.finish()  # the host copies must be complete before another engine reads them
        del self._requests[request_id]
        return handoff.export_request(request_id, request, self.models[request.model])

    def import_request(self, moved: RequestHandoff) -> None:
        """Take over a request exported by another engine of the node; it waits swapped out.

        A sequence handed over without KV blocks is recomputed (prompt plus its output so far, as
        after a preemption) once swapped in: how requests of a crashed instance resume, and those
        whose KV the host pool could not hold.
        """
        served = self.model(moved.model)
        if moved.request_id in self._requests:
            raise ValueError(f"request id {moved.request_id!r} is already in use")
        self._requests[moved.request_id] = handoff.import_request(
            moved,
            served,
            lambda index: self._new_sequence(
                served, moved.request_id, index, moved.prompt_token_ids, moved.params, moved.max_tokens
            ),
        )

    def _request(self, request_id: str) -> Request:
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
            if not seq.finished:
                seq.finish_reason = FinishReason.ABORT
                self.kv.free_host(seq)
                batcher.finish(seq)

    def has_unfinished_requests(self, model: str | None = None) -> bool:
        return any(model is None or request.model == model for request in self._requests.values())

    def requests_of(self, model: str) -> list[str]:
        """Ids of `model`'s unfinished requests, oldest first."""
        return [request_id for request_id, request in self._requests.items() if request.model == model]

    def next_token_logits(self, prompts: list[list[int]], model: str | None = None) -> torch.Tensor:
        """float32 logits `[len(prompts), vocab]` of the token after each prompt, prefilled together.

        For checking the model against a reference; it borrows KV blocks and returns them at once.
        """
        served = self.model(model)
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

    def synchronize(self) -> None:
        """Return once every rank is done with the calls made so far (without TP: at once)."""
        if self.group is not None:
            self.group.barrier()

    def step(self) -> list[RequestDelta]:
        """Run one forward pass of the active model; what it added to each request it advanced."""
        served = self.active
        if served is None:
            raise RuntimeError("no model is active: switch_to one first")
        self.kv.reap()
        scheduled = served.batcher.schedule()
        if scheduled is None:
            return []
        scheduled = scheduled.only(self.kv.landed(scheduled.seqs))
        sampled = served.runner.step(scheduled)
        if self.group is not None:
            # Rank 0's tokens: random sampling draws differently on each rank, and every rank's
            # sequences must grow (and finish) alike for the next steps to match.
            sampled.token_ids = self.group.broadcast_object(sampled.token_ids)
        advanced: dict[str, list[SequenceDelta]] = {}
        # A prompt prefilled in chunks samples (and appears in the outputs) with its last chunk only.
        seqs = scheduled.sampling
        for seq, token_id, logprobs in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
            advanced.setdefault(seq.request_id, []).append(
                append_token(seq, token_id, logprobs, served.eos_token_ids)
            )
            if seq.finish_reason is not None:
                served.batcher.finish(seq)
        outputs = step_deltas(self._requests, advanced)
        for output in outputs:
            if output.finished:
                del self._requests[output.request_id]
        return outputs
