"""The store in this process's memory (the default: one process serves everything)."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterable
from typing import Any

from aegaeon.config import DEFAULT_FINISHED_TTL_S
from aegaeon.serve.metadata.codec import check_update, coerce, from_hash, to_hash
from aegaeon.serve.metadata.records import (
    DEFAULT_INSTANCE_TTL_S,
    InstanceInfo,
    InstanceStatus,
    ModelRecord,
    NodeInfo,
    RequestRecord,
    RequestState,
)
from aegaeon.serve.metadata.store import MetadataStore


class MemoryStore(MetadataStore):
    """The store in this process's memory: one lock over plain dicts; expiry is checked lazily."""

    def __init__(
        self,
        finished_ttl_s: float = DEFAULT_FINISHED_TTL_S,
        instance_ttl_s: float = DEFAULT_INSTANCE_TTL_S,
    ) -> None:
        super().__init__(finished_ttl_s, instance_ttl_s)
        self._lock = threading.Lock()
        self._instances: dict[str, InstanceStatus] = {}
        self._nodes: dict[str, NodeInfo] = {}
        self._placements: dict[str, set[str]] = {}
        self._requests: dict[str, RequestRecord] = {}
        self._registry: dict[str, ModelRecord] = {}
        self._expires_at: dict[str, float] = {}  # request id -> time.monotonic() deadline

    # instances
    def _put_instance(self, info: InstanceInfo) -> None:
        with self._lock:
            self._instances[info.instance_id] = InstanceStatus(copy.deepcopy(info), time.time())

    def _beat(self, instance_id: str, load: dict[str, float] | None, resident: list[str] | None) -> bool:
        with self._lock:
            self._drop_silent_instances()
            status = self._instances.get(instance_id)
            if status is None:
                return False
            status.last_seen = time.time()
            if load is not None:
                status.load = dict(load)
            if resident is not None:
                status.info.models_resident = list(resident)
            return True

    def instances(self, alive_within_s: float | None = None) -> list[InstanceStatus]:
        with self._lock:
            self._drop_silent_instances()
            since = -float("inf") if alive_within_s is None else time.time() - alive_within_s
            alive = [s for s in self._instances.values() if s.last_seen >= since]
            return [copy.deepcopy(s) for s in sorted(alive, key=lambda s: s.info.instance_id)]

    def _delete_instance(self, instance_id: str) -> None:
        with self._lock:
            self._instances.pop(instance_id, None)

    def _drop_silent_instances(self) -> None:
        """Forget instances silent for `instance_ttl_s` (the Redis store's key expiry); under the lock."""
        cutoff = time.time() - self.instance_ttl_s
        for instance_id in [i for i, s in self._instances.items() if s.last_seen < cutoff]:
            del self._instances[instance_id]

    # nodes and placement
    def _put_node(self, info: NodeInfo) -> None:
        with self._lock:
            self._nodes[info.node_id] = copy.deepcopy(info)

    def nodes(self) -> list[NodeInfo]:
        with self._lock:
            return [copy.deepcopy(self._nodes[node_id]) for node_id in sorted(self._nodes)]

    def _delete_node(self, node_id: str) -> None:
        with self._lock:
            self._nodes.pop(node_id, None)
            for holders in self._placements.values():
                holders.discard(node_id)

    def _put_placement(self, model: str, node_id: str) -> None:
        with self._lock:
            self._placements.setdefault(model, set()).add(node_id)

    def _delete_placement(self, model: str, node_id: str) -> None:
        with self._lock:
            self._placements.get(model, set()).discard(node_id)

    def placements(self, model: str) -> list[str]:
        with self._lock:
            return sorted(self._placements.get(model, ()))

    # the model registry
    def put_model(self, record: ModelRecord) -> None:
        record = from_hash(ModelRecord, to_hash(record))
        with self._lock:
            self._registry[record.name] = record

    def add_model_if_absent(self, record: ModelRecord) -> bool:
        record = from_hash(ModelRecord, to_hash(record))
        with self._lock:
            if record.name in self._registry:
                return False
            self._registry[record.name] = record
            return True

    def registered_models(self) -> list[ModelRecord]:
        with self._lock:
            return [copy.deepcopy(self._registry[name]) for name in sorted(self._registry)]

    def remove_model(self, name: str) -> None:
        with self._lock:
            self._registry.pop(name, None)

    # requests
    def put_request(self, record: RequestRecord) -> None:
        record = from_hash(RequestRecord, to_hash(record))  # a private copy, typed as Redis gives it back
        with self._lock:
            self._drop_expired()
            self._requests[record.request_id] = record
            self._set_expiry(record)

    def update_request(self, request_id: str, **request_fields: Any) -> bool:
        check_update(request_fields)
        values = {name: coerce(RequestRecord, name, value) for name, value in request_fields.items()}
        with self._lock:
            record = self._live_request(request_id)
            if record is None:
                return False
            for name, value in values.items():
                setattr(record, name, value)
            if "state" in values:
                self._set_expiry(record)
            return True

    def append_output(
        self, request_id: str, token_ids: Iterable[int], first_token_s: float | None = None
    ) -> bool:
        token_ids = [int(t) for t in token_ids]
        with self._lock:
            record = self._live_request(request_id)
            if record is None:
                return False
            record.output_token_ids.extend(token_ids)
            record.output_tokens += len(token_ids)
            if first_token_s is not None and record.first_token_s is None:
                record.first_token_s = float(first_token_s)
            return True

    def get_request(self, request_id: str) -> RequestRecord | None:
        with self._lock:
            record = self._live_request(request_id)
            return copy.deepcopy(record)

    def requests(
        self, state: RequestState | str | None = None, model: str | None = None
    ) -> list[RequestRecord]:
        state = None if state is None else RequestState(state)
        with self._lock:
            for request_id in list(self._expires_at):
                self._live_request(request_id)
            chosen = [
                r
                for r in self._requests.values()
                if (state is None or r.state is state) and (model is None or r.model == model)
            ]
            return [copy.deepcopy(r) for r in sorted(chosen, key=lambda r: (r.arrival_s, r.request_id))]

    def delete_request(self, request_id: str) -> None:
        with self._lock:
            self._requests.pop(request_id, None)
            self._expires_at.pop(request_id, None)

    def _live_request(self, request_id: str) -> RequestRecord | None:
        """The record, dropping it if expired; under the lock."""
        deadline = self._expires_at.get(request_id)
        if deadline is not None and time.monotonic() >= deadline:
            del self._expires_at[request_id]
            self._requests.pop(request_id, None)
        return self._requests.get(request_id)

    def _set_expiry(self, record: RequestRecord) -> None:
        # Re-inserted, never updated in place: `_expires_at` stays in the order of its deadlines
        # (one TTL for all), so `_drop_expired` finds every expired record at its front.
        self._expires_at.pop(record.request_id, None)
        if record.state.terminal:
            self._expires_at[record.request_id] = time.monotonic() + self.finished_ttl_s

    def _drop_expired(self) -> None:
        """Forget the records whose TTL has passed (as Redis expires them); under the lock."""
        now = time.monotonic()
        while self._expires_at:
            request_id, deadline = next(iter(self._expires_at.items()))
            if deadline > now:
                return
            del self._expires_at[request_id]
            self._requests.pop(request_id, None)
