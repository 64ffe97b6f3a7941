import math

import pytest
import torch

from aegaeon.engine.sampler import (
    Sampler,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
)
from aegaeon.engine.sampling_params import SamplingParams

DRAWS = 20_000
FREQ_TOLERANCE = 0.02


def rows_for(params: SamplingParams, count: int, **row_kwargs) -> list[SamplingRow]:
    return [SamplingRow(params=params, **row_kwargs) for _ in range(count)]


def log_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def draw(logits_row: torch.Tensor, params: SamplingParams, count: int = 2000, seed: int = 0) -> list[int]:
    """Sample `count` tokens from one row's logits, as a batch of identical rows on the global RNG."""
    torch.manual_seed(seed)
    logits = logits_row.unsqueeze(0).expand(count, -1).contiguous()
    return Sampler()(logits, rows_for(params, count)).token_ids


def frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


# --- greedy -------------------------------------------------------------------------------


def test_greedy_equals_argmax():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    out = Sampler()(logits, rows_for(SamplingParams(temperature=0), 8))
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8


def test_greedy_ties_take_first_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    greedy = SamplingParams(temperature=0)
    assert Sampler()(logits, rows_for(greedy, 2)).token_ids == [1, 0]
    # Same answer off the fast path (logprobs force the general path).
    assert Sampler()(logits, rows_for(SamplingParams(temperature=0, logprobs=1), 2)).token_ids == [1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_takes_the_first_of_equal_values_and_nans_over_a_vocabulary(dtype):
    """Ties, infinities and NaN anywhere in rows as long as a vocabulary (and a few values short of a
    vector): the same tokens as torch's argmax."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 32_003, generator=generator).to(dtype)
    logits[0, [5, 20_000]] = 50.0  # tied, far apart
    logits[1, [7, 31_990]] = float("nan")  # NaN wins, the first one
    logits[2, 32_002] = float("nan")  # in the last few values
    logits[3] = float("-inf")
    logits[4, [100, 200]] = float("inf")
    logits[5, 32_001] = 60.0  # the largest among the last few values
    expected = logits.float().argmax(dim=-1).tolist()
    assert Sampler()(logits, rows_for(SamplingParams(temperature=0), 7)).token_ids == expected
    assert Sampler()(logits[:, :15], rows_for(SamplingParams(temperature=0), 7)).token_ids == (
        logits[:, :15].float().argmax(dim=-1).tolist()
    )


def test_greedy_fast_path_accepts_half_precision():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    out = Sampler()(logits, rows_for(SamplingParams(temperature=0), 4))
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()


def test_caller_logits_are_not_modified():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(3))
    before = logits.clone()
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.5, min_p=0.1, repetition_penalty=1.3)
    Sampler()(logits, rows_for(params, 3, output_token_ids=[1, 2], prompt_token_ids=[4]))
    assert torch.equal(logits, before)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="logits must have shape"):
        Sampler()(torch.zeros(2, 5), rows_for(SamplingParams(), 3))
    with pytest.raises(ValueError, match="logits must have shape"):
        Sampler()(torch.zeros(5), rows_for(SamplingParams(), 5))


def test_empty_batch():
    out = Sampler()(torch.zeros(0, 5), [])
    assert out.token_ids == []
    assert out.logprobs == []


# --- penalties ----------------------------------------------------------------------------


def test_presence_and_frequency_penalties_match_openai_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    row = SamplingRow(params=params, output_token_ids=[1, 1, 3], prompt_token_ids=[0, 2])
    got = apply_penalties(logits.clone(), [row])
    # count(1) = 2, count(3) = 1; prompt tokens do not count for these penalties.
    expected = torch.tensor([[1.0, 2.0 - (2 * 0.25 + 0.5), 3.0, 4.0 - (1 * 0.25 + 0.5), 5.0]])
    torch.testing.assert_close(got, expected)


def test_repetition_penalty_matches_hf_formula_over_prompt_and_output():
    logits = torch.tensor([[2.0, -1.0, -2.0, 3.0, 0.5]])
    params = SamplingParams(repetition_penalty=2.0)
    row = SamplingRow(params=params, output_token_ids=[2], prompt_token_ids=[0, 0])
    got = apply_penalties(logits.clone(), [row])
    # Seen tokens 0 (positive: divided) and 2 (negative: multiplied); the rest untouched.
    torch.testing.assert_close(got, torch.tensor([[1.0, -1.0, -4.0, 3.0, 0.5]]))


def test_repetition_penalty_applies_before_presence_penalty():
    logits = torch.tensor([[3.0, 0.0]])
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=1.0)
    got = apply_penalties(logits.clone(), [SamplingRow(params=params, output_token_ids=[0])])
    assert got[0, 0].item() == pytest.approx(3.0 / 1.5 - 1.0)


def test_penalties_touch_only_rows_that_ask():
    logits = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    rows = [
        SamplingRow(params=SamplingParams(), output_token_ids=[1]),
        SamplingRow(params=SamplingParams(frequency_penalty=1.0), output_token_ids=[1]),
        SamplingRow(params=SamplingParams(repetition_penalty=2.0), prompt_token_ids=[1]),
    ]
    got = apply_penalties(logits.clone(), rows)
    torch.testing.assert_close(got, torch.tensor([[1.0, 2.0], [1.0, 1.0], [1.0, 1.0]]))


@pytest.mark.parametrize(("frequency_penalty", "expected"), [(0.2, 1), (0.3, 0)])
def test_frequency_penalty_flips_greedy_choice_at_the_right_value(frequency_penalty, expected):
    # Token 1 leads by 0.5 and was generated twice: it loses once 2 * penalty > 0.5.
    logits = torch.tensor([[1.0, 1.5]])
    params = SamplingParams(temperature=0, frequency_penalty=frequency_penalty)
    out = Sampler()(logits, [SamplingRow(params=params, output_token_ids=[1, 1])])
    assert out.token_ids == [expected]


@pytest.mark.parametrize(("presence_penalty", "expected"), [(0.4, 1), (0.6, 0)])
def test_presence_penalty_flips_greedy_choice_at_the_right_value(presence_penalty, expected):
    logits = torch.tensor([[1.0, 1.5]])
    params = SamplingParams(temperature=0, presence_penalty=presence_penalty)
    out = Sampler()(logits, [SamplingRow(params=params, output_token_ids=[1, 1, 1])])
    assert out.token_ids == [expected]


# --- top_k / top_p / min_p ----------------------------------------------------------------


def test_apply_top_k_keeps_exactly_k_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [9.0, 8.0, 7.0, 6.0, 5.0]])
    got = apply_top_k(logits.clone(), [2, 3])
    assert torch.isfinite(got[0]).nonzero().flatten().tolist() == [1, 3]
    assert torch.isfinite(got[1]).nonzero().flatten().tolist() == [0, 1, 2]
    # Kept logits are unchanged.
    assert got[0, 1].item() == 5.0


def test_apply_top_k_with_ties_keeps_exactly_k():
    got = apply_top_k(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), [2])
    assert int(torch.isfinite(got).sum()) == 2


def test_top_k_sampling_support_is_the_top_k():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0, 1.8, 0.0, 1.7])
    params = SamplingParams(top_k=3)
    generator = torch.Generator().manual_seed(7)
    row = SamplingRow(params=params, generator=generator)
    sampler = Sampler()
    tokens = {sampler(logits.unsqueeze(0), [row]).token_ids[0] for _ in range(300)}
    assert tokens == {1, 2, 4}


def test_top_k_disabled_values_and_k_at_least_vocab():
    logits = torch.zeros(5)
    for top_k in (0, -1, 5, 100):
        assert set(draw(logits, SamplingParams(top_k=top_k), count=500)) == set(range(5))


def test_apply_top_p_keeps_smallest_nucleus():
    logits = log_probs([0.5, 0.3, 0.15, 0.05]).unsqueeze(0).repeat(4, 1)
    got = apply_top_p(logits, [0.8, 0.81, 0.3, 1.0])
    kept = [torch.isfinite(r).nonzero().flatten().tolist() for r in got]
    assert kept == [[0, 1], [0, 1, 2], [0], [0, 1, 2, 3]]


def test_apply_top_p_always_keeps_the_top_token():
    got = apply_top_p(log_probs([0.1, 0.9]).unsqueeze(0), [1e-9])
    assert torch.isfinite(got[0]).tolist() == [False, True]


def test_top_p_sampling_support():
    params = SamplingParams(top_p=0.8)
    assert set(draw(log_probs([0.5, 0.3, 0.15, 0.05]), params)) == {0, 1}
    # Order in the vocabulary does not matter, only order by probability.
    assert set(draw(log_probs([0.05, 0.15, 0.3, 0.5]), params)) == {2, 3}


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    logits = log_probs([0.4, 0.3, 0.2, 0.1])
    # Alone, top_p = 0.5 needs two tokens (0.4 < 0.5); after top_k = 2 the top token
    # has 0.4 / 0.7 = 0.57 >= 0.5 on its own.
    assert set(draw(logits, SamplingParams(top_p=0.5))) == {0, 1}
    assert set(draw(logits, SamplingParams(top_p=0.5, top_k=2))) == {0}


def test_apply_min_p_drops_tokens_below_fraction_of_max():
    logits = log_probs([0.5, 0.3, 0.15, 0.05]).unsqueeze(0).repeat(3, 1)
    got = apply_min_p(logits, [0.35, 0.2, 1.0])
    kept = [torch.isfinite(r).nonzero().flatten().tolist() for r in got]
    # Thresholds 0.175, 0.1 and 0.5.
    assert kept == [[0, 1], [0, 1, 2], [0]]


def test_min_p_sampling_support():
    assert set(draw(log_probs([0.05, 0.5, 0.3, 0.15]), SamplingParams(min_p=0.35))) == {1, 2}


def test_truncation_applies_only_to_rows_that_ask():
    logits = log_probs([0.4, 0.3, 0.2, 0.1]).unsqueeze(0).expand(3000, -1).contiguous()
    restricted = SamplingParams(top_k=1)
    rows = [SamplingRow(params=restricted if i % 2 else SamplingParams()) for i in range(3000)]
    torch.manual_seed(0)
    tokens = Sampler()(logits, rows).token_ids
    assert set(tokens[1::2]) == {0}
    assert set(tokens[0::2]) == {0, 1, 2, 3}


# --- temperature and the sampling distribution --------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_samples_follow_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 0.2])
    tokens = draw(logits, SamplingParams(temperature=temperature), count=DRAWS, seed=11)
    expected = torch.softmax(logits.double() / temperature, dim=-1)
    assert (frequencies(tokens, 6) - expected).abs().max().item() < FREQ_TOLERANCE


def test_seeded_rows_follow_the_same_distribution():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5]])
    row = SamplingRow(params=SamplingParams(temperature=0.8), generator=torch.Generator().manual_seed(5))
    sampler = Sampler()
    tokens = [sampler(logits, [row]).token_ids[0] for _ in range(5000)]
    expected = torch.softmax(logits[0].double() / 0.8, dim=-1)
    assert (frequencies(tokens, 4) - expected).abs().max().item() < 2 * FREQ_TOLERANCE


# --- seeds --------------------------------------------------------------------------------

STEPS = 30
VOCAB = 64


def seeded_sequence(seed: int, neighbours: list[SamplingRow], position: int) -> list[int]:
    """Tokens a seeded row samples over STEPS steps, placed at `position` among `neighbours`."""
    logits_gen = torch.Generator().manual_seed(99)
    row = SamplingRow(params=SamplingParams(temperature=0.9, seed=seed))
    row.generator = torch.Generator().manual_seed(seed)
    batch = list(neighbours)
    batch.insert(position, row)
    sampler = Sampler()
    tokens = []
    for _ in range(STEPS):
        logits = torch.randn(len(batch), VOCAB, generator=logits_gen)
        logits[position] = torch.linspace(0.0, 1.0, VOCAB)  # the seeded row's logits are fixed
        token = sampler(logits, batch).token_ids[position]
        row.output_token_ids.append(token)
        tokens.append(token)
    return tokens


def test_same_seed_same_sequence_and_different_seed_different_sequence():
    first = seeded_sequence(123, [], 0)
    assert seeded_sequence(123, [], 0) == first
    assert seeded_sequence(124, [], 0) != first


def test_seeded_row_is_unaffected_by_batch_neighbours():
    alone = seeded_sequence(123, [], 0)
    neighbours = [
        SamplingRow(params=SamplingParams()),
        SamplingRow(params=SamplingParams(temperature=0)),
        SamplingRow(
            params=SamplingParams(top_p=0.5, top_k=10, seed=7), generator=torch.Generator().manual_seed(7)
        ),
        SamplingRow(params=SamplingParams(min_p=0.2, presence_penalty=1.0, logprobs=3), output_token_ids=[1]),
    ]
    assert seeded_sequence(123, neighbours, 2) == alone
    assert seeded_sequence(123, neighbours[:1], 1) == alone


# --- logprobs -----------------------------------------------------------------------------


def test_logprobs_come_from_raw_logits_with_rank_and_sorted_top():
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0, -1.0]])
    raw = torch.log_softmax(logits[0], dim=-1)
    # Penalties and temperature change what is sampled, not the reported logprobs.
    params = SamplingParams(temperature=0, presence_penalty=2.0, logprobs=3)
    out = Sampler()(logits, [SamplingRow(params=params, output_token_ids=[1])])
    entry = out.logprobs[0]
    assert out.token_ids == [3]  # 3.0 - 2 = 1.0 < 2.0
    assert entry.token_id == 3
    assert entry.logprob == pytest.approx(raw[3].item())
    assert entry.rank == 2
    assert [t for t, _ in entry.top] == [1, 3, 2]
    for token, value in entry.top:
        assert value == pytest.approx(raw[token].item())


def test_logprobs_zero_gives_sampled_token_only_and_rows_without_get_none():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(4))
    rows = [
        SamplingRow(params=SamplingParams(logprobs=0)),
        SamplingRow(params=SamplingParams()),
        SamplingRow(params=SamplingParams(temperature=0, logprobs=5)),
    ]
    torch.manual_seed(0)
    out = Sampler()(logits, rows)
    assert out.logprobs[1] is None
    first, third = out.logprobs[0], out.logprobs[2]
    assert first.top == []
    assert first.token_id == out.token_ids[0]
    raw = torch.log_softmax(logits, dim=-1)
    assert first.logprob == pytest.approx(raw[0, first.token_id].item())
    assert first.rank == int((raw[0] > raw[0, first.token_id]).sum()) + 1
    assert third.rank == 1
    assert third.token_id == logits[2].argmax().item()
    assert len(third.top) == 5
    values = [v for _, v in third.top]
    assert values == sorted(values, reverse=True)
    assert [t for t, _ in third.top] == raw[2].topk(5).indices.tolist()


def test_logprobs_are_float32_for_half_precision_logits():
    logits = torch.tensor([[0.0, 10.0, 10.0625]], dtype=torch.bfloat16)
    out = Sampler()(logits, [SamplingRow(params=SamplingParams(temperature=0, logprobs=1))])
    expected = torch.log_softmax(logits.float(), dim=-1)[0, 2].item()
    assert out.token_ids == [2]
    assert math.isclose(out.logprobs[0].logprob, expected, rel_tol=1e-6)
