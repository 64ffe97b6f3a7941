"""Simulator and capacity planner: the scheduler package against baselines, on a latency model."""
