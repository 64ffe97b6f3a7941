"""A request moving between engines of a node (prefill -> decode, or resumed after a crash).

A handoff is plain data, picklable: the KV itself stays in the node's shared host KV pool and only
block handles travel. The receiving engine rebuilds each sequence by replaying its tokens through
the output post-processor, so its detokenizer and stop matcher continue exactly where they were.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from aegaeon.engine.postprocess import replay
from aegaeon.engine.residency import ServedModel
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.sequence import FinishReason, Request, Sequence, SequenceStatus


@dataclass
class SequenceHandoff:
    """One sequence of a request moving between engines; its KV waits in the host KV pool."""

    index: int
    output_token_ids: list[int]
    host_blocks: list[int]  # empty: its KV is lost and is recomputed from prompt and output so far
    generator_state: torch.Tensor | None
    finish_reason: str | None


@dataclass
class RequestHandoff:
    """A request leaving one engine (a prefill instance) for another (a decode instance) of the node."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    seqs: list[SequenceHandoff]


def export_request(request_id: str, request: Request, served: ServedModel) -> RequestHandoff:
    """Take a swapped-out request out of its batcher; its host KV blocks now belong to the handoff
    (a sequence whose KV was dropped goes without: it is recomputed where it arrives)."""
    handoffs = []
    for seq in request.seqs:
        if not seq.finished:
            if seq.status is not SequenceStatus.SWAPPED:
                raise RuntimeError(f"request {request_id} has a sequence still on the device")
            served.batcher.swapped.remove(seq)
        handoffs.append(
            SequenceHandoff(
                index=seq.index,
                output_token_ids=list(seq.output_token_ids),
                host_blocks=list(seq.host_blocks),
                generator_state=seq.generator.get_state() if seq.generator is not None else None,
                finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            )
        )
        seq.host_blocks = []
    first = request.seqs[0]
    return RequestHandoff(
        request_id,
        request.model,
        request.prompt_token_ids,
        first.params,
        first.max_tokens,
        handoffs,
    )


def import_request(
    handoff: RequestHandoff, served: ServedModel, new_sequence: Callable[[int], Sequence]
) -> Request:
    """Rebuild a handed-over request for `served`; its sequences wait swapped out (or to be recomputed).

    `new_sequence(index)` makes a fresh sequence of the request's prompt and parameters.
    """
    seqs = []
    for moved in handoff.seqs:
        seq = new_sequence(moved.index)
        if moved.generator_state is not None:
            seq.generator.set_state(moved.generator_state)
        replay(seq, moved.output_token_ids, served.eos_token_ids)
        if moved.finish_reason is not None:
            seq.finish_reason = FinishReason(moved.finish_reason)
            seq.status = SequenceStatus.FINISHED
        else:
            # Without blocks its KV was lost (an instance process died) or dropped (the host pool was
            # full): swapping it in recomputes it from prompt and output so far.
            seq.host_blocks = list(moved.host_blocks)
            seq.status = SequenceStatus.SWAPPED
            served.batcher.swapped.append(seq)
        seqs.append(seq)
    return Request(served.name, list(handoff.prompt_token_ids), seqs)
