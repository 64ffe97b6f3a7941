"""ContinuousBatcher on real Sequences and a real BlockAllocator; the model is played by `advance`."""

from __future__ import annotations

import random

import pytest

from aegaeon.engine.batcher import ContinuousBatcher, PrefillChunk, ScheduledStep
from aegaeon.engine.kv_cache import BLOCK_SIZE, BlockAllocator
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.sequence import Sequence, SequenceStatus
from aegaeon.scheduler.models import blocks_for_tokens

NO_LIMIT = 1 << 30


def make_seq(seq_id: int, prompt_len: int, max_tokens: int = NO_LIMIT) -> Sequence:
    # The batcher never detokenizes, so no tokenizer is needed.
    return Sequence(
        seq_id=seq_id,
        request_id=f"r{seq_id}",
        index=0,
        prompt_token_ids=[1] * prompt_len,
        params=SamplingParams(),
        max_tokens=max_tokens,
        detokenizer=None,
        stop_matcher=None,
    )


def make_batcher(num_blocks: int, max_num_seqs: int = 64, max_num_batched_tokens: int = 4096):
    return ContinuousBatcher(BlockAllocator(num_blocks), max_num_seqs, max_num_batched_tokens)


def advance(batcher: ContinuousBatcher, step: ScheduledStep) -> list[Sequence]:
    """What the engine does after a forward pass: one token per sequence that sampled (every decoded
    one, and those whose prompt the step completed); retire the done."""
    done = []
    for seq in step.sampling:
        seq.output_token_ids.append(7)
        if len(seq.output_token_ids) >= seq.max_tokens:
            batcher.finish(seq)
            done.append(seq)
    return done


def ids(seqs) -> list[int]:
    return [seq.seq_id for seq in seqs]


def has_work(batcher: ContinuousBatcher) -> bool:
    return bool(batcher.waiting or batcher.running or batcher.swapped)


def chunks(step: ScheduledStep) -> list[tuple[int, int, int]]:
    """(sequence id, start, end) of each chunk of a prefill step."""
    return [(seq.seq_id, c.start, c.end) for seq, c in zip(step.seqs, step.chunks, strict=True)]


def check_blocks(batcher: ContinuousBatcher) -> None:
    """Every block is either free or held by exactly one running sequence; waiting ones hold none."""
    allocator = batcher.allocator
    held = [block for seq in batcher.running for block in seq.block_table]
    assert len(held) == len(set(held)), "a block is held twice"
    assert len(held) + allocator.num_free == allocator.num_blocks
    assert all(not seq.block_table for seq in batcher.waiting)


# ---------------------------------------------------------------------------- admission


def test_fcfs_admission_allocates_prompt_blocks():
    batcher = make_batcher(num_blocks=10)
    seqs = [make_seq(i, n) for i, n in enumerate((5, 16, 17, 33))]
    for seq in seqs:
        batcher.add(seq)
    step = batcher.schedule()
    assert step.is_prefill and ids(step.seqs) == [0, 1, 2, 3]
    assert [len(seq.block_table) for seq in seqs] == [1, 1, 2, 3]
    assert all(seq.status is SequenceStatus.RUNNING for seq in seqs)
    assert batcher.allocator.num_free == 10 - 7
    check_blocks(batcher)


def test_head_of_line_waits_and_later_small_request_does_not_jump_it():
    batcher = make_batcher(num_blocks=4)
    first, big, small = make_seq(0, 20), make_seq(1, 40), make_seq(2, 5)  # 2, 3 and 1 blocks
    for seq in (first, big, small):
        batcher.add(seq)
    step = batcher.schedule()
    assert ids(step.seqs) == [0]
    advance(batcher, step)
    # 2 blocks are free: `small` would fit, but `big` came first and does not.
    step = batcher.schedule()
    assert not step.is_prefill and ids(step.seqs) == [0]
    assert ids(batcher.waiting) == [1, 2]
    batcher.finish(first)
    step = batcher.schedule()
    assert step.is_prefill and ids(step.seqs) == [1, 2]
    check_blocks(batcher)


def test_token_budget_splits_prefills():
    batcher = make_batcher(num_blocks=20, max_num_batched_tokens=32)
    a, b, c = make_seq(0, 20), make_seq(1, 20), make_seq(2, 5)
    for seq in (a, b, c):
        batcher.add(seq)
    step = batcher.schedule()
    assert step.is_prefill and ids(step.seqs) == [0]  # 20 + 20 > 32; c may not jump b
    advance(batcher, step)
    step = batcher.schedule()
    assert step.is_prefill and ids(step.seqs) == [1, 2]  # 20 + 5 <= 32
    advance(batcher, step)
    step = batcher.schedule()
    assert not step.is_prefill and ids(step.seqs) == [0, 1, 2]


def test_prompt_longer_than_budget_is_prefilled_in_chunks():
    batcher = make_batcher(num_blocks=20, max_num_batched_tokens=32)
    long = make_seq(0, 100)
    batcher.add(long)
    seen = []
    while not long.output_token_ids:
        step = batcher.schedule()
        assert step.is_prefill and sum(c.end - c.start for c in step.chunks) <= 32
        # Every block of the prompt is allocated up front: each chunk's KV has its slots.
        assert len(long.block_table) == blocks_for_tokens(100)
        seen.append(chunks(step))
        assert step.sampling == ([long] if step.chunks[0].end == 100 else [])
        advance(batcher, step)
    assert seen == [[(0, 0, 32)], [(0, 32, 64)], [(0, 64, 96)], [(0, 96, 100)]]
    step = batcher.schedule()
    assert not step.is_prefill and ids(step.seqs) == [0]
    check_blocks(batcher)


def test_long_prompt_starts_with_the_budget_left_and_others_follow_its_last_chunk():
    batcher = make_batcher(num_blocks=20, max_num_batched_tokens=32)
    short, long, other, second = make_seq(0, 4), make_seq(1, 50), make_seq(2, 4), make_seq(3, 40)
    for seq in (short, long, other, second):
        batcher.add(seq)
    step = batcher.schedule()
    # A prompt that fits the budget is never split; a longer one takes what the step has left.
    assert chunks(step) == [(0, 0, 4), (1, 0, 28)] and ids(step.sampling) == [0]
    advance(batcher, step)
    step = batcher.schedule()  # a decode of `short` between two chunks of `long`
    assert not step.is_prefill and ids(step.seqs) == [0]
    advance(batcher, step)
    step = batcher.schedule()
    # `long` goes on first; `other` fits whole after it; `second` (40 > 32) starts with the rest.
    assert chunks(step) == [(1, 28, 50), (2, 0, 4), (3, 0, 6)] and ids(step.sampling) == [1, 2]
    advance(batcher, step)
    step = batcher.schedule()
    assert not step.is_prefill and ids(step.seqs) == [0, 1, 2]  # `second` is mid-prompt: not decoded
    advance(batcher, step)
    step = batcher.schedule()
    assert chunks(step) == [(3, 6, 38)] and step.sampling == []
    advance(batcher, step)
    assert ids(batcher.schedule().seqs) == [0, 1, 2]
    step = batcher.schedule()
    assert chunks(step) == [(3, 38, 40)] and ids(step.sampling) == [3]
    check_blocks(batcher)


def test_preempted_prompt_restarts_and_swapped_one_goes_on():
    batcher = make_batcher(num_blocks=20, max_num_batched_tokens=16)
    a, b = make_seq(0, 40), make_seq(1, 40)
    batcher.add(a)
    step = batcher.schedule()
    assert chunks(step) == [(0, 0, 16)]
    batcher.preempt(a)  # its KV is gone: the prompt starts over
    assert a.status is SequenceStatus.WAITING and a not in batcher.prefilled
    assert chunks(batcher.schedule()) == [(0, 0, 16)]
    batcher.add(b)
    # Swapped out mid-prompt and back in: the cached chunks came back with it, it goes on.
    batcher.swap_out(a)
    assert chunks(batcher.schedule()) == [(1, 0, 16)]
    batcher.swap_out(b)
    a.host_blocks = [0] * blocks_for_tokens(40)
    batcher.swap_in(a)
    assert chunks(batcher.schedule()) == [(0, 16, 32)]


def test_only_keeps_the_chunks_of_the_kept_sequences():
    seqs = [make_seq(i, 10 + i) for i in range(3)]
    step = ScheduledStep(True, seqs, [PrefillChunk(0, 10), PrefillChunk(0, 5), PrefillChunk(4, 12)])
    kept = step.only([seqs[0], seqs[2]])
    assert ids(kept.seqs) == [0, 2] and kept.chunks == [PrefillChunk(0, 10), PrefillChunk(4, 12)]
    assert ids(kept.sampling) == [0, 2]
    assert ScheduledStep(True, seqs).chunks == [PrefillChunk(0, n) for n in (10, 11, 12)]


def test_max_num_seqs_caps_the_running_batch():
    batcher = make_batcher(num_blocks=20, max_num_seqs=2)
    seqs = [make_seq(i, 3) for i in range(3)]
    for seq in seqs:
        batcher.add(seq)
    step = batcher.schedule()
    assert ids(step.seqs) == [0, 1]
    advance(batcher, step)
    for _ in range(3):
        step = batcher.schedule()
        assert not step.is_prefill and ids(step.seqs) == [0, 1]
        advance(batcher, step)
    batcher.finish(seqs[0])
    step = batcher.schedule()
    assert step.is_prefill and ids(step.seqs) == [2]
    advance(batcher, step)
    assert ids(batcher.schedule().seqs) == [1, 2]


def test_idle_batcher_schedules_nothing():
    batcher = make_batcher(num_blocks=4)
    assert batcher.schedule() is None and not has_work(batcher)


# ---------------------------------------------------------------------------- blocks while decoding


@pytest.mark.parametrize("prompt_len", [1, 15, 16, 17])
def test_new_block_exactly_when_crossing_a_block_boundary(prompt_len):
    batcher = make_batcher(num_blocks=8)
    seq = make_seq(0, prompt_len)
    neighbour = make_seq(1, 3)
    batcher.add(seq)
    batcher.add(neighbour)
    grew_at = []  # num_tokens of `seq` when the step that grew its block table was scheduled
    blocks = 0
    while seq.num_tokens < 3 * BLOCK_SIZE + 2:
        step = batcher.schedule()
        # The KV of every token so far, including the one this step feeds, has a slot; no more.
        assert len(seq.block_table) == blocks_for_tokens(seq.num_tokens)
        if len(seq.block_table) > blocks:
            grew_at.append(seq.num_tokens)
            blocks = len(seq.block_table)
        check_blocks(batcher)
        advance(batcher, step)
    first = grew_at[0]
    assert first == prompt_len  # the prefill allocates the prompt's blocks
    expected = [n for n in range(first + 1, seq.num_tokens) if n % BLOCK_SIZE == 1]
    assert grew_at[1:] == expected  # then one block each time token 17, 33, ... is fed


def test_preemption_takes_the_most_recently_admitted():
    batcher = make_batcher(num_blocks=4)
    seqs = [make_seq(i, 15) for i in range(3)]
    late = make_seq(3, 40)  # needs 3 blocks: waits behind
    for seq in (*seqs, late):
        batcher.add(seq)
    step = batcher.schedule()
    assert ids(step.seqs) == [0, 1, 2] and batcher.allocator.num_free == 1
    advance(batcher, step)  # 16 tokens each: still one block each
    step = batcher.schedule()
    assert ids(step.seqs) == [0, 1, 2] and batcher.allocator.num_free == 1
    advance(batcher, step)  # 17 tokens each: every one needs a second block, one is free
    step = batcher.schedule()
    # seq 0 takes the free block; seq 1's block comes from preempting seq 2, the last admitted.
    assert not step.is_prefill and ids(step.seqs) == [0, 1]
    victim = seqs[2]
    assert victim.status is SequenceStatus.WAITING and victim.block_table == []
    assert victim.output_token_ids == [7, 7]  # kept, to be recomputed
    assert ids(batcher.waiting) == [2, 3]  # back at the head of the queue, ahead of `late`
    assert [len(s.block_table) for s in seqs[:2]] == [2, 2]
    check_blocks(batcher)

    # Once blocks free up, the victim is readmitted first, prefilling prompt + output so far.
    batcher.finish(seqs[0])
    step = batcher.schedule()
    assert step.is_prefill and ids(step.seqs) == [2]
    assert len(victim.block_table) == blocks_for_tokens(victim.num_tokens) == 2
    check_blocks(batcher)


def test_sequence_preempts_itself_when_it_is_the_last():
    batcher = make_batcher(num_blocks=2)
    early, last = make_seq(0, 10), make_seq(1, 16)
    batcher.add(early)
    batcher.add(last)
    advance(batcher, batcher.schedule())  # 11 and 17 tokens
    step = batcher.schedule()
    assert ids(step.seqs) == [0]
    assert last.status is SequenceStatus.WAITING and ids(batcher.waiting) == [1]
    check_blocks(batcher)


def test_several_preemptions_keep_arrival_order():
    batcher = make_batcher(num_blocks=3)
    seqs = [make_seq(i, 16) for i in range(3)]
    for seq in seqs:
        batcher.add(seq)
    advance(batcher, batcher.schedule())  # 17 tokens each, 0 blocks free
    step = batcher.schedule()
    # 0 needs a block: preempt 2. 1 needs one: none left, and 1 is now last: preempt 1.
    assert ids(step.seqs) == [0]
    assert ids(batcher.waiting) == [1, 2]
    check_blocks(batcher)


# ---------------------------------------------------------------------------- retirement


def test_all_blocks_return_after_finish():
    batcher = make_batcher(num_blocks=6)
    seqs = [make_seq(i, n, max_tokens=m) for i, (n, m) in enumerate(((3, 30), (20, 5), (9, 14)))]
    for seq in seqs:
        batcher.add(seq)
    finished = []
    while has_work(batcher):
        finished += advance(batcher, batcher.schedule())
        check_blocks(batcher)
    assert sorted(ids(finished)) == [0, 1, 2]
    assert all(seq.status is SequenceStatus.FINISHED and seq.block_table == [] for seq in seqs)
    assert [len(seq.output_token_ids) for seq in seqs] == [30, 5, 14]
    allocator = batcher.allocator
    assert allocator.num_free == 6
    assert sorted(allocator.allocate(6)) == list(range(6))  # each block once, none lost or doubled


def test_finishing_a_waiting_sequence_removes_it():
    batcher = make_batcher(num_blocks=1)
    running, waiting = make_seq(0, 10), make_seq(1, 10)
    batcher.add(running)
    batcher.add(waiting)
    batcher.schedule()
    batcher.finish(waiting)  # an abort while queued
    assert waiting.status is SequenceStatus.FINISHED and not batcher.waiting
    batcher.finish(running)
    assert not has_work(batcher) and batcher.allocator.num_free == 1


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_keeps_invariants_and_finishes(seed):
    """Random prompts and lengths through a tight cache: blocks stay consistent, every sequence ends."""
    rng = random.Random(seed)
    num_blocks, max_num_seqs, budget = 12, 5, 64
    batcher = make_batcher(num_blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    pending = []
    for i in range(25):
        prompt = rng.randrange(1, 150)  # some longer than the budget: prefilled in chunks
        # Alone, every sequence fits the cache (what the engine's max_model_len guarantees).
        max_tokens = rng.randrange(1, num_blocks * BLOCK_SIZE - prompt + 1)
        pending.append(make_seq(i, prompt, max_tokens))
    finished: list[Sequence] = []
    steps = 0
    cached: dict[int, int] = {}  # tokens of each sequence whose KV the steps so far computed
    while pending or has_work(batcher):
        if pending and rng.random() < 0.3:
            batcher.add(pending.pop(0))
        step = batcher.schedule()
        if step is None:
            continue
        assert len(batcher.running) <= max_num_seqs
        for seq in step.seqs:
            assert seq.status is SequenceStatus.RUNNING
            assert len(seq.block_table) == blocks_for_tokens(seq.num_tokens)
        if step.is_prefill:
            assert sum(c.end - c.start for c in step.chunks) <= budget
            for seq, chunk in zip(step.seqs, step.chunks, strict=True):
                # A chunk follows on from the cached ones; a (re)admitted prompt starts from 0.
                assert chunk.start == (cached.get(seq.seq_id, 0) if chunk.start else 0) < chunk.end
                cached[seq.seq_id] = chunk.end
        else:
            for seq in step.seqs:  # only sequences whose whole prompt is cached decode
                assert cached[seq.seq_id] == seq.num_tokens - 1
                cached[seq.seq_id] += 1
        check_blocks(batcher)
        finished += advance(batcher, step)
        steps += 1
        assert steps < 20_000, "no progress"
    assert sorted(ids(finished)) == list(range(25))
    assert all(len(seq.output_token_ids) == seq.max_tokens for seq in finished)
    assert batcher.allocator.num_free == num_blocks
