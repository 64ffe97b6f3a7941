"""Admission control: what a node refuses or sheds under overload, and the errors that say so.

Refusing early (a bounded wait per model) is kinder than accepting a request that will time out:
the client learns at once, with a hint of when to retry. Shedding (optional) fails a request that
waited so long for its prefill that its answer would come too late to matter. Neither ever drops a
request silently: the submitter gets the error.
"""

from __future__ import annotations

import math

# The shortest Retry-After a refusal suggests: a client should not hammer an overloaded node.
MIN_RETRY_AFTER_S = 1


class Overloaded(RuntimeError):
    """The node refused a request: too many of its model's requests wait already (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: int = MIN_RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        # Crosses process boundaries (node -> api server) pickled: keep both fields.
        return (type(self), (str(self), self.retry_after_s))


class Draining(RuntimeError):
    """The node is shutting down: it finishes what it has but takes nothing new (send it elsewhere)."""


class Shed(RuntimeError):
    """An accepted request was failed because it waited too long to start (overload shedding)."""


def retry_after_s(waiting_work_s: float) -> int:
    """Whole seconds a refused client should wait: the predicted time until the queue drains."""
    return max(MIN_RETRY_AFTER_S, math.ceil(waiting_work_s))
