"""One generated sequence: its tokens, its KV blocks and its progress (a request with n > 1 has n)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from aegaeon.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from aegaeon.engine.grammar import GrammarMatcher
from aegaeon.engine.sampler import TokenLogprobs
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.tokenizer import Tokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # off the device: its KV in the host pool (no host blocks: recomputed)
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a sequence ended, with the names OpenAI's API uses."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    """A sequence being generated; `token_ids` is the prompt followed by the output so far.

    Its text and logprobs are not kept: each step hands them out as deltas.
    """

    seq_id: int
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher | None
    generator: torch.Generator | None = None
    grammar: GrammarMatcher | None = None  # structured outputs: where the output is in its grammar
    eos_token_ids: frozenset[int] = frozenset()  # the model's; ruled out until params.min_tokens
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    # While swapped out: the host KV pool blocks holding its KV.
    host_blocks: list[int] = field(default_factory=list)
    # While its KV is being copied in: the copy to wait for (a `memory.copies.Copy`).
    kv_arrival: object | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    # Prompt logprobs (asked for by params.prompt_logprobs, kept by the first sequence only): the next
    # prompt position still to score, and those scored but not yet handed out (None for the first token).
    prompt_logprobs_next: int = 1
    pending_prompt_logprobs: list[TokenLogprobs | None] | None = None

    @classmethod
    def start(
        cls,
        seq_id: int,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        tokenizer: Tokenizer,
        device: torch.device,
        grammar: GrammarMatcher | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> Sequence:
        """The `index`-th of a request's sequences, before its first token."""
        matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
        # Each of a request's n samples gets its own seeded stream, so they differ yet stay reproducible.
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed + index)
        return cls(
            seq_id=seq_id,
            request_id=request_id,
            index=index,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            max_tokens=max_tokens,
            detokenizer=IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens),
            stop_matcher=matcher,
            generator=generator,
            grammar=grammar,
            eos_token_ids=eos_token_ids,
            pending_prompt_logprobs=[None] if params.prompt_logprobs is not None and index == 0 else None,
        )

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether prompt positions are still to be scored (prefill computes their logits too)."""
        return self.pending_prompt_logprobs is not None and self.prompt_logprobs_next < len(
            self.prompt_token_ids
        )

    @property
    def banned_token_ids(self) -> list[int]:
        """Tokens that may not come next: those that would end the sequence before min_tokens."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return []
        eos = [] if self.params.ignore_eos else sorted(self.eos_token_ids)
        return eos + self.params.stop_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class Request:
    """A request inside an engine: its model, prompt and `n` sequences."""

    model: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.seqs)
