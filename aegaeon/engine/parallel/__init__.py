"""Tensor parallelism inside an instance: weights sharded over ranks, driven in lockstep by rank 0."""
