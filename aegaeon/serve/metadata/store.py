"""The metadata store's interface: what both stores share, and what each implements."""

from __future__ import annotations

import copy
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

from aegaeon.serve.metadata.records import (
    DEFAULT_ALIVE_WITHIN_S,
    InstanceInfo,
    InstanceStatus,
    ModelRecord,
    NodeInfo,
    RequestRecord,
    RequestState,
)


class MetadataStore(ABC):
    """Instances, nodes, placements and request records; every method is thread-safe."""

    def __init__(self, finished_ttl_s: float, instance_ttl_s: float) -> None:
        self.finished_ttl_s = finished_ttl_s
        self.instance_ttl_s = instance_ttl_s
        # What this client registered, replayed by `reregister` after the store lost it (a Redis restart).
        self._own_lock = threading.Lock()
        self._own_nodes: dict[str, NodeInfo] = {}
        self._own_instances: dict[str, InstanceInfo] = {}
        self._own_placements: set[tuple[str, str]] = set()

    # instances
    def register_instance(self, info: InstanceInfo) -> None:
        """Add or replace an instance; registering counts as a heartbeat (with an empty load)."""
        with self._own_lock:
            self._own_instances[info.instance_id] = copy.deepcopy(info)
        self._put_instance(info)

    def heartbeat(
        self,
        instance_id: str,
        load: Mapping[str, float] | None = None,
        models_resident: Iterable[str] | None = None,
    ) -> bool:
        """Mark the instance alive now, with its load summary (None keeps the last one).

        An instance this client registered but the store no longer knows (Redis restarted, or it was
        silent for `instance_ttl_s`) is written back, with the nodes and placements this client
        registered; other instances come back on their own heartbeats, so none looks alive that is not.
        False: the instance is unknown.
        """
        load = None if load is None else {key: float(value) for key, value in load.items()}
        resident = None if models_resident is None else list(models_resident)
        with self._own_lock:
            own = self._own_instances.get(instance_id)
            if own is not None and resident is not None:
                own.models_resident = list(resident)
        if self._beat(instance_id, load, resident):
            return True
        if own is None:
            return False
        self._replay(instance_ids=[instance_id])
        return self._beat(instance_id, load, resident)

    @abstractmethod
    def instances(self, alive_within_s: float | None = None) -> list[InstanceStatus]:
        """Registered instances, by id; with `alive_within_s`, only those that beat within that window."""

    def get_instance(self, instance_id: str) -> InstanceStatus | None:
        return next((s for s in self.instances() if s.info.instance_id == instance_id), None)

    def remove_instance(self, instance_id: str) -> None:
        with self._own_lock:
            self._own_instances.pop(instance_id, None)
        self._delete_instance(instance_id)

    # nodes and placement
    def register_node(self, info: NodeInfo) -> None:
        """Add or replace a node."""
        with self._own_lock:
            self._own_nodes[info.node_id] = copy.deepcopy(info)
        self._put_node(info)

    @abstractmethod
    def nodes(self) -> list[NodeInfo]:
        """Registered nodes, by id."""

    def get_node(self, node_id: str) -> NodeInfo | None:
        return next((n for n in self.nodes() if n.node_id == node_id), None)

    def remove_node(self, node_id: str) -> None:
        """Drop a node and its placements (its instances leave on their own, or age out)."""
        with self._own_lock:
            self._own_nodes.pop(node_id, None)
            self._own_placements = {p for p in self._own_placements if p[1] != node_id}
        self._delete_node(node_id)

    def place_model(self, model: str, node_id: str) -> None:
        """Record that `node_id` holds `model` (in its host cache or on a device)."""
        with self._own_lock:
            self._own_placements.add((model, node_id))
        self._put_placement(model, node_id)

    def unplace_model(self, model: str, node_id: str) -> None:
        with self._own_lock:
            self._own_placements.discard((model, node_id))
        self._delete_placement(model, node_id)

    @abstractmethod
    def placements(self, model: str) -> list[str]:
        """Ids of the nodes holding `model`, sorted."""

    def pick_node(
        self,
        model: str,
        alive_within_s: float = DEFAULT_ALIVE_WITHIN_S,
        extra_load: Mapping[str, float] | None = None,
    ) -> str | None:
        """The least-loaded live node holding `model`, else the least-loaded live node able to load it.

        A node is live while one of its instances is; its load is its instances' mean `busy`, plus
        `extra_load[node]`: what the caller knows the last heartbeats do not show yet (an api server's
        own requests in flight), so a burst between two heartbeats is spread rather than piled on one.
        """
        per_node: dict[str, list[float]] = {}
        for status in self.instances(alive_within_s):
            per_node.setdefault(status.info.node_id, []).append(status.busy)
        extra = extra_load or {}
        load = {node: sum(busy) / len(busy) + extra.get(node, 0.0) for node, busy in per_node.items()}
        holding = [node for node in self.placements(model) if node in load]
        able = [n.node_id for n in self.nodes() if model in n.models and n.node_id in load]
        candidates = holding or able
        return min(candidates, key=lambda node: (load[node], node)) if candidates else None

    # the model registry
    @abstractmethod
    def put_model(self, record: ModelRecord) -> None:
        """Add or replace a registered model."""

    @abstractmethod
    def add_model_if_absent(self, record: ModelRecord) -> bool:
        """Register `record` unless a model of that name is registered already; True if it was added."""

    @abstractmethod
    def registered_models(self) -> list[ModelRecord]:
        """Every registered model, by name."""

    def registered_model(self, name: str) -> ModelRecord | None:
        return next((m for m in self.registered_models() if m.name == name), None)

    @abstractmethod
    def remove_model(self, name: str) -> None:
        """Drop a model from the registry (its placements stay until the nodes drop them)."""

    # requests
    @abstractmethod
    def put_request(self, record: RequestRecord) -> None:
        """Add or replace a request's record (a terminal state starts its expiry)."""

    @abstractmethod
    def update_request(self, request_id: str, **request_fields: Any) -> bool:
        """Set some fields of a record at once, leaving the others as they are; False if it is gone.

        Setting a terminal `state` starts the record's expiry (`finished_ttl_s`).
        """

    @abstractmethod
    def append_output(
        self, request_id: str, token_ids: Iterable[int], first_token_s: float | None = None
    ) -> bool:
        """Append generated tokens and count them; `first_token_s` is kept only if none is set yet."""

    @abstractmethod
    def get_request(self, request_id: str) -> RequestRecord | None: ...

    @abstractmethod
    def requests(
        self, state: RequestState | str | None = None, model: str | None = None
    ) -> list[RequestRecord]:
        """Records (not yet expired) by arrival, optionally only of one state and/or model."""

    @abstractmethod
    def delete_request(self, request_id: str) -> None: ...

    # lifecycle
    def reregister(self) -> None:
        """Write again every node, placement and instance this client registered (after a store loss)."""
        self._replay(instance_ids=None)

    def _replay(self, instance_ids: list[str] | None) -> None:
        """Write again this client's nodes, placements and instances (all, or those named)."""
        with self._own_lock:
            nodes = list(self._own_nodes.values())
            placements = sorted(self._own_placements)
            instances = [
                copy.deepcopy(info)
                for instance_id, info in self._own_instances.items()
                if instance_ids is None or instance_id in instance_ids
            ]
        for node in nodes:
            self._put_node(node)
        for model, node_id in placements:
            self._put_placement(model, node_id)
        for info in instances:
            self._put_instance(info)

    def close(self) -> None:  # noqa: B027 (optional hook: a memory store holds no connections)
        """Release connections (the data stays)."""

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # what each implementation writes
    @abstractmethod
    def _put_instance(self, info: InstanceInfo) -> None: ...

    @abstractmethod
    def _beat(self, instance_id: str, load: dict[str, float] | None, resident: list[str] | None) -> bool:
        """Record a heartbeat; False if the instance is unknown."""

    @abstractmethod
    def _delete_instance(self, instance_id: str) -> None: ...

    @abstractmethod
    def _put_node(self, info: NodeInfo) -> None: ...

    @abstractmethod
    def _delete_node(self, node_id: str) -> None: ...

    @abstractmethod
    def _put_placement(self, model: str, node_id: str) -> None: ...

    @abstractmethod
    def _delete_placement(self, model: str, node_id: str) -> None: ...
