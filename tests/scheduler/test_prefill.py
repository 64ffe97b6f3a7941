from __future__ import annotations

import pytest

from aegaeon.config import SchedulerConfig
from aegaeon.scheduler.prefill import PrefillDispatcher, PrefillQueue
from tests.scheduler.helpers import predictor, profile, req

CONFIG = SchedulerConfig()  # max_group_size 8
SWITCH_S = 0.5
# Prefill of a prompt of P tokens takes P ms: easy arithmetic.
PRED = predictor(**{m: profile(prefill=(0.0, 1e-3, 0.0), switch_s=SWITCH_S) for m in "abcd"})


def _queues(count: int, loaded: str | None = None) -> list[PrefillQueue]:
    return [PrefillQueue(f"p{i}", PRED, CONFIG, loaded_model=loaded) for i in range(count)]


def _dispatcher(count: int = 2, loaded: str | None = None) -> PrefillDispatcher:
    return PrefillDispatcher(_queues(count, loaded), CONFIG)


def test_joins_a_same_model_group_rather_than_the_idle_instance() -> None:
    d = _dispatcher(2)
    d.submit(req("a1", "a", 0.0, prompt=1000))
    d.submit(req("a2", "a", 0.1, prompt=1000))
    placements = d.dispatch(now=0.2)
    assert [(p.instance, p.new_group) for p in placements] == [(0, True), (0, False)]
    # Instance 1 was idle, yet a2 joined a's group on instance 0: no extra switch.
    assert len(d.instances[0].groups) == 1 and len(d.instances[0].groups[0].pending) == 2
    assert len(d.instances[1]) == 0


def test_ninth_request_starts_a_new_group() -> None:
    d = _dispatcher(1)
    for i in range(9):
        d.submit(req(f"a{i}", "a", float(i)))
    placements = d.dispatch(now=10.0)
    assert [p.new_group for p in placements] == [True] + [False] * 7 + [True]
    groups = d.instances[0].groups
    assert [len(g.pending) for g in groups] == [8, 1]


def test_ninth_request_goes_to_the_least_loaded_instance() -> None:
    d = _dispatcher(2)
    for i in range(9):
        d.submit(req(f"a{i}", "a", float(i)))
    placements = d.dispatch(now=10.0)
    assert placements[-1].instance == 1 and placements[-1].new_group


def test_group_size_counts_requests_already_run() -> None:
    d = _dispatcher(1)
    for i in range(8):
        d.submit(req(f"a{i}", "a", float(i)))
    d.dispatch(now=0.0)
    queue = d.instances[0]
    for _ in range(3):
        queue.pop(now=1.0)
    d.submit(req("late", "a", 2.0))
    (placement,) = d.dispatch(now=2.0)
    # Only 5 wait in the group, but it has run 3: it is full, so a fairness-preserving new group.
    assert placement.new_group and len(queue.groups) == 2


def test_new_model_goes_to_the_instance_with_least_waiting_work() -> None:
    d = _dispatcher(3)
    d.submit(req("a1", "a", 0.0, prompt=4000))  # 4 s + a switch on p0
    d.submit(req("b1", "b", 0.1, prompt=1000))  # 1 s + a switch on p1
    d.submit(req("c1", "c", 0.2, prompt=100))  # p2 is empty
    d.submit(req("d1", "d", 0.3, prompt=100))  # p2 has 0.1 s + switch = 0.6 < p1's 1.5
    assert [p.instance for p in d.dispatch(now=0.5)] == [0, 1, 2, 2]
    assert d.instances[2].waiting_work_s(0.5) == pytest.approx(0.1 + 0.1 + 2 * SWITCH_S)


def test_waiting_work_counts_a_switch_per_model_change_only() -> None:
    q = PrefillQueue("p", PRED, CONFIG, loaded_model="a")
    q.append_group(req("a1", "a", 0.0, prompt=100))  # same model as loaded: no switch
    q.append_group(req("b1", "b", 0.0, prompt=200))  # switch
    q.append_group(req("b2", "b", 0.0, prompt=300))  # same as before it: no switch
    q.append_group(req("a2", "a", 0.0, prompt=400))  # switch
    assert q.waiting_work_s(0.0) == pytest.approx(1.0 + 2 * SWITCH_S)


def test_switch_time_decides_between_equal_prefill_work() -> None:
    d = _dispatcher(2)
    d.instances[0].loaded_model = "a"
    d.instances[1].loaded_model = "b"
    d.instances[0].append_group(req("x", "a", 0.0, prompt=500))  # 0.5 s, no switch
    d.instances[1].append_group(req("y", "a", 0.0, prompt=500))  # 0.5 s + a switch
    d.submit(req("c1", "c", 1.0))
    (placement,) = d.dispatch(now=1.0)
    assert placement.instance == 0


def test_fcfs_across_models_by_head_arrival() -> None:
    d = _dispatcher(1)
    d.submit(req("b1", "b", 2.0))
    d.submit(req("a1", "a", 1.0))
    d.submit(req("a2", "a", 3.0))
    d.submit(req("c1", "c", 1.5))
    assert sum(len(q) for q in d.instances) == 0  # nothing is placed before `dispatch`
    assert [p.request.request_id for p in d.dispatch(now=5.0)] == ["a1", "c1", "b1", "a2"]
    assert sum(len(q) for q in d.instances) == 4
    # a2 joined a1's group although b and c groups were queued after it.
    assert [g.model for g in d.instances[0].groups] == ["a", "c", "b"]


def test_within_a_model_the_fifo_keeps_submission_order() -> None:
    d = _dispatcher(1)
    d.submit(req("a1", "a", 5.0))
    d.submit(req("a2", "a", 1.0))  # FIFO: a model's requests are taken in the order they came
    assert [p.request.request_id for p in d.dispatch(now=6.0)] == ["a1", "a2"]


def test_pop_runs_groups_in_order_one_request_at_a_time() -> None:
    q = PrefillQueue("p", PRED, CONFIG, loaded_model="b")
    a = q.append_group(req("a1", "a", 0.0, prompt=100))
    q.join(a, req("a2", "a", 0.0, prompt=100))
    q.append_group(req("b1", "b", 0.0, prompt=100))
    assert q.peek_model() == "a" and q.prefetch_model() == "a"
    t1 = q.pop(now=0.0)
    assert (t1.request.request_id, t1.switch, t1.predicted_s) == ("a1", True, pytest.approx(0.1))
    assert q.loaded_model == "a" and q.prefetch_model() == "b"  # a runs: prefetch the next group's b
    # The running request is work until its predicted end (switch + prefill).
    assert q.waiting_work_s(0.2) == pytest.approx(0.6 - 0.2 + 0.1 + 0.1 + SWITCH_S)
    t2 = q.pop(now=0.6)
    assert (t2.request.request_id, t2.switch) == ("a2", False)
    assert q.peek_model() == "b"
    t3 = q.pop(now=0.7)
    assert (t3.request.request_id, t3.switch) == ("b1", True)
    q.complete()
    assert q.pop(now=1.5) is None and q.waiting_work_s(1.5) == 0.0
    assert q.peek_model() is None and q.prefetch_model() is None


def test_join_refuses_a_full_group_or_another_model() -> None:
    q = PrefillQueue("p", PRED, SchedulerConfig(max_group_size=1))
    g = q.append_group(req("a1", "a", 0.0))
    with pytest.raises(ValueError, match="full"):
        q.join(g, req("a2", "a", 0.0))
    with pytest.raises(ValueError, match="cannot join"):
        PrefillQueue("p", PRED, CONFIG).join(g, req("b1", "b", 0.0))


def test_remove_drops_a_waiting_request_and_its_work() -> None:
    q = PrefillQueue("p", PRED, CONFIG, loaded_model="a")
    r = req("a1", "a", 0.0, prompt=100)
    q.append_group(r)
    assert q.remove(r) and len(q) == 0 and q.waiting_work_s(0.0) == 0.0
    assert not q.remove(r)
