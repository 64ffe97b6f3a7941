"""From sampled tokens to what a step hands out: stop checks, detokenizing, finishing, the deltas.

`append_token` is the one path a token takes into a sequence: sampled by a step, or replayed when a
request is imported from another engine (so the detokenizer and stop matcher end in the same state).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aegaeon.engine.outputs import RequestDelta, SequenceDelta
from aegaeon.engine.sampler import TokenLogprobs
from aegaeon.engine.sequence import FinishReason, Request, Sequence


def append_token(
    seq: Sequence, token_id: int, logprobs: TokenLogprobs | None, eos_token_ids: frozenset[int]
) -> SequenceDelta:
    """Add a token to `seq`, finishing it on a stop token, eos, stop string or max_tokens; what it added."""
    seq.output_token_ids.append(token_id)
    # Logprobs come with every token of a sequence that asked for them, and with no other.
    delta = SequenceDelta(seq.index, [token_id], "", [logprobs] if logprobs is not None else None, None)
    if seq.pending_prompt_logprobs:  # scored by the prefill that sampled this (first) token
        delta.prompt_logprobs, seq.pending_prompt_logprobs = seq.pending_prompt_logprobs, []
    if seq.grammar is not None:
        seq.grammar.accept(token_id)
    params = seq.params
    if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_token_ids):
        delta.text = finish(seq, FinishReason.STOP)
    else:
        delta.text = seq.detokenizer.add(token_id)
        stopped = False
        if seq.stop_matcher is not None:
            delta.text, stopped = seq.stop_matcher.feed(delta.text)
        if stopped:  # the matcher already cut the text at the stop string
            seq.finish_reason = FinishReason.STOP
        elif seq.grammar is not None and seq.grammar.finished:  # nothing may follow but eos
            delta.text += finish(seq, FinishReason.STOP)
        elif len(seq.output_token_ids) >= seq.max_tokens:
            delta.text += finish(seq, FinishReason.LENGTH)
    if seq.finish_reason is not None:
        delta.finish_reason = seq.finish_reason.value
    return delta


def finish(seq: Sequence, reason: FinishReason) -> str:
    """End a sequence for a reason other than a stop string; the held-back text it releases."""
    tail = seq.detokenizer.flush()
    if seq.stop_matcher is not None:
        tail = seq.stop_matcher.feed(tail)[0] + seq.stop_matcher.finish()
        if seq.stop_matcher.matched is not None:
            reason = FinishReason.STOP
    seq.finish_reason = reason
    return tail


def replay(seq: Sequence, token_ids: Iterable[int], eos_token_ids: frozenset[int]) -> None:
    """Rebuild a sequence's state from tokens it already generated (and reported) elsewhere."""
    if token_ids:  # its prompt logprobs went out with its first token
        seq.pending_prompt_logprobs = None
    for token_id in token_ids:
        append_token(seq, token_id, None, eos_token_ids)


def step_deltas(
    requests: Mapping[str, Request], advanced: Mapping[str, list[SequenceDelta]]
) -> list[RequestDelta]:
    """A step's output: one delta per request it advanced, its sequences in index order."""
    return [
        RequestDelta(request_id, sorted(deltas, key=lambda d: d.index), requests[request_id].finished)
        for request_id, deltas in advanced.items()
    ]
