"""Copies between host and device memory that run beside the computation, each ending in an event.

Scale-ups (a model's byte range in chunks) and KV swaps (one copy per block) both go through a
`CopyStream`. On CUDA the copies are issued on a dedicated stream from page-locked host memory and
an event marks their end, so the compute stream keeps working meanwhile and later waits only on
what it reads. On the CPU there is no second engine to copy with: a copy runs inline, or on a
background thread when asked (a tensor copy releases the GIL), and its thread marks its end.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

CopyPairs = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (target, source)


class Copy:
    """A batch of copies in flight, or already done."""

    def __init__(self, event: torch.cuda.Event | None = None):
        self._event = event
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        if self._event is not None:
            return self._event.query()
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> None:
        """Return when the compute stream may read the copied bytes (on CUDA, without stalling the host)."""
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error

    def synchronize(self) -> None:
        """Return when the copy has finished, host included (before its source may be reused)."""
        if self._event is not None:
            self._event.synchronize()
        self.wait()


class CopyStream:
    """Issues copies off the compute path of one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(self, pairs: CopyPairs, background: bool = False) -> Copy:
        """Start `target.copy_(source)` for each pair; on the CPU inline unless `background`."""
        if self.stream is not None:
            # The copy may read what the compute stream just wrote (KV), or overwrite what it just
            # read (an evicted model): it starts after the work already queued there.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for target, source in pairs:
                    target.copy_(source, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            return Copy(event)
        copy = Copy()
        if not background:
            for target, source in pairs:
                target.copy_(source)
            return copy

        def run() -> None:
            try:
                for target, source in pairs:
                    target.copy_(source)
            except BaseException as error:  # noqa: BLE001 - raised again by Copy.wait in the caller
                copy._error = error

        copy._thread = threading.Thread(target=run, name="aegaeon-copy", daemon=True)
        copy._thread.start()
        return copy
