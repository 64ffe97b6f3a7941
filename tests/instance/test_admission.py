"""Overload at a node: a bounded wait per model refuses with a retry hint; late requests can be shed.

A user sees: past the limit, a request is refused at once (never queued and forgotten) with a hint of
when to retry; every accepted request either completes or, when shedding is on, fails with an error
that says it waited too long. Nothing accepted goes unanswered.
"""

from __future__ import annotations

import threading

import pytest

from aegaeon.engine.outputs import RequestOutput
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.instance.admission import Overloaded, Shed
from aegaeon.instance.node import Node
from tests.instance.test_node import node_config

BURST = 30
TOKENS = 4
FINISH_TIMEOUT_S = 120.0


class Outcomes:
    """Each request's one terminal outcome: its final output, or its error."""

    def __init__(self):
        self.outputs: dict[str, RequestOutput] = {}
        self.finished: dict[str, RequestOutput] = {}
        self.failed: dict[str, BaseException] = {}
        self.accepted = 0
        self._lock = threading.Lock()
        self.all_done = threading.Event()

    def on_output(self, output) -> None:
        total = self.outputs.setdefault(output.request_id, RequestOutput(output.request_id, None, []))
        total.add(output)
        if output.finished:
            with self._lock:
                assert output.request_id not in self.finished and output.request_id not in self.failed
                self.finished[output.request_id] = total
                self._check()

    def on_error(self, request_id: str):
        def record(error: BaseException) -> None:
            with self._lock:
                assert request_id not in self.finished and request_id not in self.failed
                self.failed[request_id] = error
                self._check()

        return record

    def _check(self) -> None:
        if len(self.finished) + len(self.failed) == self.accepted:
            self.all_done.set()


def burst(node: Node, model: str) -> tuple[Outcomes, list[Overloaded]]:
    outcomes, refused = Outcomes(), []
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    for index in range(BURST):
        request_id = f"{model}-{index}"
        try:
            node.submit(
                [5, 6, 7, index], params, model, outcomes.on_output, outcomes.on_error(request_id), request_id
            )
            outcomes.accepted += 1
        except Overloaded as error:
            refused.append(error)
    return outcomes, refused


def test_a_burst_past_the_waiting_limit_is_refused_with_a_retry_hint(five_model_dirs, profile_path):
    config = node_config(profile_path, max_waiting_per_model=3)
    with Node({"llama": five_model_dirs["llama"]}, config, progress=False) as node:
        outcomes, refused = burst(node, "llama")
        assert refused, "a burst of 30 against a limit of 3 waiting should be refused in part"
        assert all(error.retry_after_s >= 1 and "the limit is 3" in str(error) for error in refused)
        assert outcomes.all_done.wait(FINISH_TIMEOUT_S)
        assert not outcomes.failed
        assert all(len(o.outputs[0].token_ids) == TOKENS for o in outcomes.finished.values())
        assert outcomes.accepted + len(refused) == BURST


def test_shedding_fails_late_requests_with_a_reason_and_serves_the_rest(five_model_dirs, profile_path):
    config = node_config(profile_path, shed_waiting_after_s=0.001)
    with Node({"llama": five_model_dirs["llama"]}, config, progress=False) as node:
        outcomes, refused = burst(node, "llama")
        assert not refused and outcomes.accepted == BURST
        assert outcomes.all_done.wait(FINISH_TIMEOUT_S), "an accepted request went unanswered"
        assert outcomes.failed, "requests queued behind 29 others waited more than 1 ms"
        assert all(isinstance(e, Shed) and "waited" in str(e) for e in outcomes.failed.values())
        assert len(outcomes.finished) + len(outcomes.failed) == BURST
        assert not node.live


@pytest.mark.parametrize("bad", [{"max_waiting_per_model": 0}, {"shed_waiting_after_s": -1.0}])
def test_bad_admission_settings_say_what_to_fix(profile_path, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        node_config(profile_path, **bad)
