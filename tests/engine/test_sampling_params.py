import pytest

from aegaeon.engine.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert p.n == 1
    assert p.max_tokens == 16
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == 0
    assert p.min_p == 0.0
    assert p.presence_penalty == 0.0
    assert p.frequency_penalty == 0.0
    assert p.repetition_penalty == 1.0
    assert p.seed is None
    assert p.stop == []
    assert p.stop_token_ids == []
    assert p.ignore_eos is False
    assert p.logprobs is None
    assert p.skip_special_tokens is True
    assert p.include_stop_str_in_output is False
    assert not p.greedy


def test_default_lists_are_not_shared():
    a, b = SamplingParams(), SamplingParams()
    a.stop.append("x")
    assert b.stop == []


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.5).greedy


def test_stop_str_is_normalised_to_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop_token_ids=(1, 2)).stop_token_ids == [1, 2]


def test_valid_edge_values_accepted():
    SamplingParams(max_tokens=None, top_p=1.0, top_k=-1, min_p=1.0, logprobs=0)
    SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=0.5, seed=0)
    SamplingParams(logprobs=MAX_LOGPROBS, seed=2**64 - 1, top_k=5)


def test_int_floats_are_normalised_to_float():
    p = SamplingParams(temperature=0, top_p=1, presence_penalty=1)
    assert isinstance(p.temperature, float)
    assert isinstance(p.top_p, float)
    assert isinstance(p.presence_penalty, float)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be an int >= 1, got 0"),
        ({"n": True}, "n must be an int >= 1"),
        ({"n": 1.0}, "n must be an int >= 1"),
        ({"max_tokens": 0}, "max_tokens must be an int >= 1 or None, got 0"),
        ({"max_tokens": 2.5}, "max_tokens must be an int >= 1 or None"),
        ({"temperature": -1}, "temperature must be >= 0, got -1"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"temperature": "1"}, "temperature must be a finite number"),
        ({"temperature": True}, "temperature must be a finite number"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_k": -2}, "top_k must be an int >= 0, or -1 to disable, got -2"),
        ({"top_k": 3.0}, "top_k must be an int"),
        ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1"),
        ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0, got 0"),
        ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0"),
        ({"seed": 1.5}, "seed must be None or an int"),
        ({"seed": 2**64}, "seed must be None or an int that fits in 64 bits"),
        ({"seed": False}, "seed must be None or an int"),
        ({"stop": ""}, "stop must be a non-empty str or a list of non-empty str"),
        ({"stop": ["ok", ""]}, "stop must be a non-empty str or a list of non-empty str"),
        ({"stop": [1]}, "stop must be a non-empty str or a list"),
        ({"stop": 5}, "stop must be a non-empty str or a list"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must be a list of ints >= 0"),
        ({"stop_token_ids": [True]}, "stop_token_ids must be a list of ints >= 0"),
        ({"stop_token_ids": 3}, "stop_token_ids must be a list of ints >= 0"),
        ({"logprobs": -1}, f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got -1"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs must be None or an int in [0, 20]"),
        ({"logprobs": True}, "logprobs must be None or an int"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool, got 1"),
        ({"skip_special_tokens": None}, "skip_special_tokens must be a bool"),
        ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output must be a bool"),
    ],
)
def test_invalid_values_raise_helpful_errors(kwargs, message):
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**kwargs)
    assert message in str(excinfo.value)
