"""The engine for one model on one device: requests in, tokens and text out, step by step."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from aegaeon.config import EngineConfig
from aegaeon.engine.architecture import Architecture
from aegaeon.engine.batcher import ContinuousBatcher
from aegaeon.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from aegaeon.engine.kv_cache import (
    BLOCK_SIZE,
    BlockAllocator,
    allocate_kv_cache,
    blocks_for_tokens,
    kv_block_bytes,
)
from aegaeon.engine.outputs import CompletionOutput, RequestOutput
from aegaeon.engine.runner import ModelRunner
from aegaeon.engine.sampler import TokenLogprobs
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.sequence import FinishReason, Sequence
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.engine.weights import ModelWeights, load_state, parse_dtype, resolve_model_dir


@dataclass
class _Request:
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]


class LLMEngine:
    """Continuous batching over a paged KV cache for one model on one device."""

    def __init__(
        self,
        model: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        config: EngineConfig | None = None,
    ):
        self.config = config or EngineConfig()
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        self.model_dir = resolve_model_dir(model)
        self.arch = Architecture.from_pretrained(self.model_dir)
        self.tokenizer = Tokenizer.from_pretrained(self.model_dir)
        self.eos_token_ids = frozenset(self.arch.eos_token_ids) | self.tokenizer.eos_token_ids

        state = {
            name: tensor.to(self.device)
            for name, tensor in load_state(self.model_dir, self.arch, self.dtype).items()
        }
        num_blocks = self.config.kv_cache_bytes // kv_block_bytes(self.arch, self.dtype)
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_bytes={self.config.kv_cache_bytes} holds no KV block of this model "
                f"({kv_block_bytes(self.arch, self.dtype)} bytes each)"
            )
        self.max_model_len = min(
            self.config.max_model_len or self.arch.max_position,
            self.arch.max_position,
            num_blocks * BLOCK_SIZE,
        )
        kv_cache = allocate_kv_cache(self.arch, num_blocks, self.dtype, self.device)
        self.runner = ModelRunner(
            self.arch, ModelWeights.from_state(self.arch, state), kv_cache, self.device, self.dtype
        )
        self.batcher = ContinuousBatcher(
            BlockAllocator(num_blocks), self.config.max_num_seqs, self.config.max_num_batched_tokens
        )
        self._requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> None:
        """Queue a prompt (text, or token ids) for generation; raises ValueError on bad input."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._prompt_tokens(prompt)
        room = self.max_model_len - len(token_ids)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens; this model accepts at most "
                f"{self.max_model_len - 1} prompt tokens (max_model_len is {self.max_model_len})"
            )
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seqs = [
            self._new_sequence(request_id, index, token_ids, params, max_tokens) for index in range(params.n)
        ]
        for seq in seqs:
            self.batcher.add(seq)
        self._requests[request_id] = _Request(text, list(token_ids), seqs)

    def _new_sequence(
        self, request_id: str, index: int, token_ids: list[int], params: SamplingParams, max_tokens: int
    ) -> Sequence:
        return Sequence(
            seq_id=next(self._seq_ids),
            request_id=request_id,
            index=index,
            prompt_token_ids=list(token_ids),
            params=params,
            max_tokens=max_tokens,
            detokenizer=IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens),
            stop_matcher=StopStringMatcher(params.stop, params.include_stop_str_in_output)
            if params.stop
            else None,
            generator=self._generator(params.seed, index),
        )

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its sequences end with finish_reason "abort"."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason = FinishReason.ABORT
                self.batcher.finish(seq)

    def next_token_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """float32 logits `[len(prompts), vocab]` of the token after each prompt, prefilled together.

        For checking the model against a reference; it borrows KV blocks and returns them at once.
        """
        seqs = []
        try:
            for prompt in prompts:
                _, token_ids = self._prompt_tokens(prompt)
                seq = self._new_sequence("logits", 0, token_ids, SamplingParams(), max_tokens=1)
                seq.block_table = self.batcher.allocator.allocate(blocks_for_tokens(len(token_ids)))
                seqs.append(seq)
            return self.runner.logits(seqs, is_prefill=True)
        finally:
            for seq in seqs:
                self.batcher.allocator.free(seq.block_table)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[RequestOutput]:
        """Run one forward pass; the outputs of every request it advanced."""
        scheduled = self.batcher.schedule()
        if scheduled is None:
            return []
        sampled = self.runner.step(scheduled.seqs, scheduled.is_prefill)
        touched: dict[str, None] = {}
        for seq, token_id, logprobs in zip(scheduled.seqs, sampled.token_ids, sampled.logprobs, strict=True):
            self._append_token(seq, token_id, logprobs)
            if seq.finish_reason is not None:
                self.batcher.finish(seq)
            touched[seq.request_id] = None
        return [self._output(request_id) for request_id in touched]

    def _prompt_tokens(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            token_ids, text = list(prompt), None
            bad = [t for t in token_ids if not 0 <= t < self.arch.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt token id {bad[0]} is outside the vocabulary [0, {self.arch.vocab_size})"
                )
        else:
            raise ValueError("a prompt must be a string or a list of token ids")
        if not token_ids:
            raise ValueError("the prompt is empty")
        return text, token_ids

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        # Each of a request's n samples gets its own stream, so they differ yet stay reproducible.
        return torch.Generator(device=self.device).manual_seed(seed + index)

    def _append_token(self, seq: Sequence, token_id: int, logprobs: TokenLogprobs | None) -> None:
        seq.output_token_ids.append(token_id)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        params = seq.params
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids):
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
