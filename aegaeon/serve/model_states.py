"""Where a registered model is, as `/v1/models` reports it: on a device, in a host cache, loading, on disk.

A model's state across the cluster is the best of its states on the nodes (device > host > loading >
disk): what its next request will wait for. Torch-free: api servers import it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from aegaeon.config import MODEL_IN_HOST as HOST
from aegaeon.config import MODEL_LOADING as LOADING
from aegaeon.config import MODEL_ON_DEVICE as DEVICE
from aegaeon.config import MODEL_ON_DISK as DISK

if TYPE_CHECKING:
    from aegaeon.memory.model_cache import HostModelCache

STATES = (DEVICE, HOST, LOADING, DISK)  # best first


def host_state(cache: HostModelCache, key: str) -> str:
    """The model under `key` in a node's host model cache: HOST when ready there, LOADING while it is
    being read in, else DISK (read without touching its place in the cache's LRU order)."""
    return cache.state(key) or DISK


def best_state(states: Iterable[str]) -> str:
    """The best of a model's states on the nodes (DISK if it is on none)."""
    return min(states, key=STATES.index, default=DISK)
