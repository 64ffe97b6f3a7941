from __future__ import annotations

import pytest

from aegaeon.scheduler.request import SchedRequest


def test_tokens_grow_the_context_and_finish_at_max_tokens() -> None:
    r = SchedRequest("r", "m", arrival_s=1.0, prompt_len=10, max_tokens=2)
    assert r.context_len == 10 and r.first_token_s is None and not r.done
    r.record_token(1.5)
    assert r.context_len == 11 and r.first_token_s == 1.5 and r.remaining_tokens == 1 and not r.done
    r.record_token(1.6)
    assert r.done and r.finished_s == 1.6 and r.token_times == [1.5, 1.6]
    with pytest.raises(ValueError, match="already done"):
        r.record_token(1.7)


def test_finish_early_and_fail() -> None:
    r = SchedRequest("r", "m", 0.0, 4, 100)
    r.record_token(0.1)
    r.finish(0.2)
    assert r.done and not r.failed and r.finished_s == 0.2
    f = SchedRequest("f", "m", 0.0, 4, 100)
    f.fail(0.3)
    assert f.done and f.failed


def test_final_len_bounds_growth() -> None:
    assert SchedRequest("r", "m", 0.0, 10, 5).final_len == 15
