"""Admission control: what a node refuses or sheds under overload, and the errors that say so.

Refusing early (a bounded wait per model) is kinder than accepting a request that will time out:
the client learns at once, with a hint of when to retry. Shedding (optional) fails a request that
waited so long for its prefill that its answer would come too late to matter. Neither ever drops a
request silently: the submitter gets the error.
"""

from __future__ import annotations

import math

# The errors live with the others a client can act on; imported here, where admission raises them.
from aegaeon.errors import MIN_RETRY_AFTER_S, Draining, Overloaded, Shed

__all__ = ["MIN_RETRY_AFTER_S", "Draining", "Overloaded", "Shed", "retry_after_s"]


def retry_after_s(waiting_work_s: float) -> int:
    """Whole seconds a refused client should wait: the predicted time until the queue drains."""
    return max(MIN_RETRY_AFTER_S, math.ceil(waiting_work_s))
