"""Instances: the per-device loops that run the token-level scheduler on a real engine."""
