"""Errors that cross process boundaries (instance -> node -> api server) pickled."""

from __future__ import annotations

import pickle


def portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure is answered the same way
        return RuntimeError(f"{type(error).__name__}: {error}")
