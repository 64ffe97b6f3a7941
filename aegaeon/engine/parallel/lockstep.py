"""Rank 0 of a tensor-parallel engine: an LLMEngine whose every state-changing call also runs, in
the same order, on the engine replicas of the other ranks.

Every rank holds the same requests, block tables and schedule, because an engine is deterministic
given its calls: rank 0 makes the calls and decides with what it returns; the other ranks repeat
them. A step's collectives (all-reduces, the logit gather) keep the ranks' forward passes in step,
and its sampled tokens are rank 0's (broadcast in LLMEngine.step). The calls are sent once, as
small pickled commands on the CPU group; the step's tensors are built on every rank from its own
copy of the state. Nothing a rank decides may depend on timing, so KV moves complete before the
call that starts them returns, and what depends on the shared host KV pool (which blocks a swap-out
gets, or that the pool is full and the KV is dropped) rank 0 decides and sends with the call
(engine/kv_mover.py). A host block holds every rank's part; rank 0 frees one only after a barrier,
once no rank still reads it. Without a pool (an engine on its own), KV taken off the device is
dropped and recomputed when it comes back, exactly under greedy decoding.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch

from aegaeon.config import TENSOR_PARALLEL_TIMEOUT_S, EngineConfig, MemoryConfig, default_model_name
from aegaeon.engine.engine import LLMEngine
from aegaeon.engine.handoff import RequestHandoff
from aegaeon.engine.outputs import RequestDelta
from aegaeon.engine.parallel.ranks import Command, RankFailure, RankProcesses, rank_device
from aegaeon.engine.prompt import PreparedPrompt
from aegaeon.engine.residency import ServedModel
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.memory.kv_pool import HostKVPool
from aegaeon.memory.model_cache import HostModelCache


class TensorParallelEngine(LLMEngine):
    """An engine over `tensor_parallel_size` ranks (processes, one device each), driven from here."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        models: Mapping[str, str | Path] | None = None,
        tensor_parallel_size: int,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        config: EngineConfig | None = None,
        memory: MemoryConfig | None = None,
        model_cache: HostModelCache | None = None,
        kv_pool: HostKVPool | None = None,
        progress: bool = True,
        cpu_threads: int | None = None,
        timeout_s: float = TENSOR_PARALLEL_TIMEOUT_S,
    ):
        if tensor_parallel_size < 2:
            raise ValueError(f"a tensor-parallel engine has at least 2 ranks, got {tensor_parallel_size}")
        if (model is None) == (models is None):
            raise ValueError("pass either model=PATH or models={name: PATH, ...}")
        models = {default_model_name(str(model)): model} if model is not None else dict(models)
        self._mirroring = False  # the replicas make their own first switch, as this one does below
        self._depth = 0  # calls of the ranks' API under way (only the outermost one is sent)
        if cpu_threads is None and torch.device(device).type == "cpu":
            # The ranks share the CPU: more threads than cores in all would preempt each other.
            cpu_threads = max(1, (os.cpu_count() or 1) // tensor_parallel_size)
        self.ranks = RankProcesses.start(
            tensor_parallel_size,
            {name: str(path) for name, path in models.items()},
            str(device),
            str(dtype).removeprefix("torch."),
            config or EngineConfig(),
            memory or MemoryConfig(),
            model_cache.name if model_cache is not None else None,
            timeout_s,
            cpu_threads,
            kv_pool.name if kv_pool is not None else None,
        )
        try:
            super().__init__(
                models=models,
                device=rank_device(device, 0),
                dtype=dtype,
                config=config,
                memory=memory,
                model_cache=model_cache,
                kv_pool=kv_pool,
                progress=progress,
                group=self.ranks.group,
            )
        except BaseException:
            self.ranks.stop()
            raise
        self._mirroring = True
        self._finalizer = weakref.finalize(self, self.ranks.stop)

    @property
    def tensor_parallel_size(self) -> int:
        return self.ranks.group.size

    def close(self) -> None:
        """Stop the other ranks (also done when this engine is collected)."""
        self._finalizer()

    def _lockstep(self, method: str, args: tuple, first: bool):
        """Run `method` here and on every rank: sent `first` when it communicates (the ranks must be
        in it too), else after it succeeded here (bad input fails here only). A call made from
        within another call (a switch inside `next_token_logits`) is not sent: the ranks make it too."""
        local = getattr(LLMEngine, method)
        if self._depth or not self._mirroring:
            return local(self, *args)
        self._depth += 1
        try:
            if first:
                self.ranks.send(Command(method, args, self._take_decisions()))
                return self._collective(lambda: local(self, *args))
            result = local(self, *args)
            self.ranks.send(Command(method, args, self._take_decisions()))
            return result
        finally:
            self._depth -= 1

    def _take_decisions(self) -> dict[int, list[int] | None] | None:
        """The KV decisions made here since the last call sent, for the ranks to follow."""
        decided, self.kv.decided = self.kv.decided, {}
        return decided or None

    def _free_released(self) -> None:
        """Free the host KV blocks this rank is done with, once every rank is past its reads."""
        if self.kv.released:
            self.synchronize()
            released, self.kv.released = self.kv.released, []
            self.kv.kv_pool.free(released)

    def _collective(self, call):
        """Run a call that communicates with the ranks; a rank lost during it is a RankFailure."""
        try:
            return call()
        except RankFailure:
            raise
        except RuntimeError as error:
            self.ranks.check()
            if "gloo" in str(error).lower() or "nccl" in str(error).lower():
                raise RankFailure(f"a rank of the tensor-parallel engine failed: {error}") from error
            raise

    def switch_to(self, name: str) -> None:
        target = self.model(name)  # an unknown name fails here, not on the ranks
        if self.active is not None and target is not self.active and not self._depth:
            self.kv.evict(self.active)  # first: where its KV goes is rank 0's decision to send
        # Sent before the switch here: every rank copies its shard at the same time.
        self._lockstep("switch_to", (name,), first=True)

    def step(self) -> list[RequestDelta]:
        if self.active is None:
            raise RuntimeError("no model is active: switch_to one first")
        outputs = self._lockstep("step", (), first=True)
        self._free_released()
        return outputs

    def next_token_logits(self, prompts: list[list[int]], model: str | None = None) -> torch.Tensor:
        self.model(model)
        return self._lockstep("next_token_logits", (prompts, model), first=True)

    def synchronize(self) -> None:
        self._lockstep("synchronize", (), first=True)

    def register(self, name: str, path: str | Path, pinned: bool = False) -> ServedModel:
        return self._lockstep("register", (name, str(path), pinned), first=False)

    def unregister(self, name: str) -> None:
        self._lockstep("unregister", (name,), first=False)

    def prefetch(self, name: str) -> bool:
        return self._lockstep("prefetch", (name,), first=False)

    def swap_out(self, *request_ids: str) -> None:
        self._lockstep("swap_out", request_ids, first=False)

    def swap_in(self, *request_ids: str) -> list[str]:
        return self._lockstep("swap_in", request_ids, first=False)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        model: str | None = None,
    ) -> PreparedPrompt:
        return self._lockstep("add_request", (request_id, prompt, params, model), first=False)

    def export_request(self, request_id: str) -> RequestHandoff:
        moved = self._lockstep("export_request", (request_id,), first=False)
        self.synchronize()  # every rank's part of its host blocks is written before another reads it
        return moved

    def import_request(self, moved: RequestHandoff) -> None:
        self._lockstep("import_request", (moved,), first=False)

    def abort_request(self, request_id: str) -> None:
        self._lockstep("abort_request", (request_id,), first=False)
