"""`/dashboard` in a real headless Chromium while several models share one instance of a real node.

An operator sees: the instance's timeline lane fills with bars of more than one model as they take
turns, the models table counts their requests, and the page throws no error. The screenshot the test
saves is docs/dashboard.png (docs/operations.md shows it).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fastapi import FastAPI

from aegaeon.instance.node import Node
from aegaeon.scheduler.timeline import COMPUTE_KINDS
from aegaeon.serve.dashboard import observability_router
from aegaeon.serve.metrics import NodeMetrics
from tests.serve.chromium import Chromium
from tests.serve.http_server import ServerThread
from tests.serve.test_metrics import MODELS, RUN_TIMEOUT_S, node_config, submit_all, workload

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WINDOW_S = 60
OUTPUT_TOKENS = 64
PAGE_TIMEOUT_S = 30.0

# The timeline as drawn: per instance lane, the models of its compute bars (prefill, decode turns).
LANE_MODELS = """(() => {
  const lanes = {};
  for (const bar of document.querySelectorAll("#lanes rect.bar")) {
    if (bar.dataset.kind !== "decode_turn" && bar.dataset.kind !== "prefill") continue;
    (lanes[bar.dataset.instance] ??= new Set()).add(bar.dataset.model);
  }
  return Object.fromEntries(Object.entries(lanes).map(([name, models]) => [name, [...models].sort()]));
})()"""
MANY_MODELS_IN_A_LANE = f"Object.values({LANE_MODELS}).some((models) => models.length > 1)"


@pytest.fixture(scope="module")
def served_node(five_model_dirs, profile_path):
    with Node({m: five_model_dirs[m] for m in MODELS}, node_config(profile_path), progress=False) as node:
        app = FastAPI()
        app.include_router(observability_router(NodeMetrics(node)))
        with ServerThread(app) as server:
            yield node, server


def test_the_dashboard_shows_models_taking_turns_on_one_instance(served_node):
    node, server = served_node
    with Chromium() as browser:
        browser.navigate(f"{server.url}/dashboard?window={WINDOW_S}")
        browser.wait_for("Number(document.body.dataset.updates || 0) >= 1", PAGE_TIMEOUT_S)
        assert browser.evaluate("document.querySelectorAll('#lanes .lane').length") == len(node.instances)

        run = submit_all(node, workload(seed=3), OUTPUT_TOKENS)
        browser.wait_for(MANY_MODELS_IN_A_LANE, RUN_TIMEOUT_S)
        assert run.wait(), run.errors
        # One more poll after the run, so the screenshot shows it whole and the counts are final.
        updates = browser.evaluate("Number(document.body.dataset.updates)")
        browser.wait_for(f"Number(document.body.dataset.updates) >= {updates + 2}", PAGE_TIMEOUT_S)

        lanes = browser.evaluate(LANE_MODELS)
        # What the page draws is what the instance ran.
        for instance in node.instances:
            ran = {e.model for e in instance.timeline.events if e.kind in COMPUTE_KINDS}
            assert set(lanes.get(instance.instance_name, [])) <= ran
        assert max(len(models) for models in lanes.values()) > 1
        rows = browser.evaluate(
            "[...document.querySelectorAll('#models tbody tr')].map((r) => r.dataset.model)"
        )
        assert rows == list(MODELS)
        finished = browser.evaluate(
            "[...document.querySelectorAll('#models tbody tr')].map((r) => Number(r.cells[4].textContent))"
        )
        assert sum(finished) == len(node.completed)
        assert browser.evaluate("document.getElementById('status').className") == ""
        assert not browser.exceptions, browser.exceptions

        # The run lasts seconds: for the screenshot, zoom the timeline to it so its bars can be read.
        first = min(e.start_s for i in node.instances for e in i.timeline.events)
        zoom = math.ceil(node.now() - first) + 1
        browser.navigate(f"{server.url}/dashboard?window={zoom}")
        browser.wait_for("Number(document.body.dataset.updates || 0) >= 1", PAGE_TIMEOUT_S)
        assert not browser.exceptions, browser.exceptions
        SCREENSHOT.parent.mkdir(exist_ok=True)
        browser.screenshot(SCREENSHOT)
    assert SCREENSHOT.read_bytes().startswith(PNG_SIGNATURE)
