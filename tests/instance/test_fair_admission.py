"""Admission shared fairly by API key: at a model's waiting limit, a flooding key is refused while a key
with less than its share of the queue still gets in."""

from __future__ import annotations

import time

from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.instance.admission import Overloaded
from aegaeon.instance.node import Node
from tests.instance.test_admission import BURST, FINISH_TIMEOUT_S, TOKENS, Outcomes
from tests.instance.test_node import node_config

LIMIT = 3
POLL_S = 0.02


def test_a_flooding_key_fills_the_waiting_limit_for_itself_only(five_model_dirs, profile_path):
    config = node_config(profile_path, max_waiting_per_model=LIMIT)
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    with Node({"llama": five_model_dirs["llama"]}, config, progress=False) as node:
        outcomes, refused = Outcomes(), []

        def submit(request_id: str, key: str) -> None:
            node.submit(
                [5, 6, 7, len(request_id)] * 16,
                params,
                "llama",
                outcomes.on_output,
                outcomes.on_error(request_id),
                request_id,
                key=key,
            )
            outcomes.accepted += 1

        for index in range(BURST):
            try:
                submit(f"heavy-{index}", "key-heavy")
            except Overloaded as error:
                refused.append(error)
                break  # the heavy key holds the limit now
        assert refused, f"a burst of {BURST} against a limit of {LIMIT} waiting should be refused in part"
        # The light key holds none of the queue: it is taken, however full the heavy key keeps it.
        submit("light-0", "key-light")
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while (
            len(outcomes.finished) + len(outcomes.failed) < outcomes.accepted and time.monotonic() < deadline
        ):
            time.sleep(POLL_S)
        assert not outcomes.failed and "light-0" in outcomes.finished
        assert len(outcomes.finished) == outcomes.accepted
