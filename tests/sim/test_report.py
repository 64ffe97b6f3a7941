from __future__ import annotations

from aegaeon.sim.cluster import NodeLayout
from aegaeon.sim.report import sweep_table
from aegaeon.sim.runner import simulate
from aegaeon.sim.sweep import SweepPoint
from tests.sim.helpers import arrivals, cluster, toy_models


def test_sweep_table_columns_stay_aligned_under_a_long_series_name() -> None:
    pool = cluster(NodeLayout(colocated=1))
    result = simulate("dedicated", arrivals((0.0, "a", 10, 4)), toy_models(["a"]), pool)
    long_name = "serverless (13 s start, measured)"
    points = {"aegaeon": [SweepPoint(1, result)], long_name: [SweepPoint(1, result)]}
    header, row, sustained = sweep_table("models", points, 0.9).splitlines()
    assert long_name in header
    assert len(header) == len(row) == len(sustained)
    assert row.endswith("100.0% / 100.0% / 100.0%") and sustained.split() == ["sustained", "1", "1"]
