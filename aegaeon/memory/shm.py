"""Named shared-memory regions: a file on tmpfs that every process of a node can map.

The host model cache and the host KV pool each live in one such region. The file is created with
owner-only permissions (0600) so other users of the machine cannot read prompts' KV or weights.
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path

import torch

SHM_FILE_MODE = 0o600
# Regions a node creates are named `aegaeon-<kind>-<owner pid>-<tag>` (plus sidecar files), so the
# regions of a node that was killed (no chance to remove them) can be found and removed later.
NODE_REGION = re.compile(r"^aegaeon-[a-z]+-(\d+)-")
# cudaHostRegisterPortable: the pages count as pinned in every CUDA context, not only the current one.
HOST_REGISTER_PORTABLE = 1


def node_region_name(kind: str, tag: str) -> str:
    """The name of a region this process owns: its pid in it, for `remove_orphans`."""
    return f"aegaeon-{kind}-{os.getpid()}-{tag}"


def remove_orphans(directory: str | Path) -> list[Path]:
    """Remove the node regions (and sidecars) whose owner process is gone; the paths removed."""
    removed = []
    for path in Path(directory).glob("aegaeon-*"):
        match = NODE_REGION.match(path.name)
        if match is None or not path.is_file() or _alive(int(match.group(1))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to judge
        return True
    return True


class SharedRegion:
    """A shared-memory file mapped into this process, seen as one flat uint8 tensor."""

    def __init__(self, path: Path, file_descriptor: int, nbytes: int, owner: bool):
        self.path = path
        self.nbytes = nbytes
        self.owner = owner
        self._mmap = mmap.mmap(file_descriptor, nbytes)
        os.close(file_descriptor)
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8, count=nbytes)
        self._pinned = False

    @classmethod
    def create(cls, directory: str | Path, name: str, nbytes: int) -> SharedRegion:
        """A new region of `nbytes` zeroed bytes; fails if a region of that name already exists."""
        if nbytes < 1:
            raise ValueError(f"a shared region needs at least one byte, got {nbytes}")
        path = Path(directory) / name
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, SHM_FILE_MODE)
        try:
            os.ftruncate(descriptor, nbytes)
        except OSError:
            os.close(descriptor)
            path.unlink(missing_ok=True)
            raise
        return cls(path, descriptor, nbytes, owner=True)

    @classmethod
    def attach(cls, directory: str | Path, name: str) -> SharedRegion:
        """Map an existing region (created by another process of this node)."""
        path = Path(directory) / name
        descriptor = os.open(path, os.O_RDWR)
        return cls(path, descriptor, os.fstat(descriptor).st_size, owner=False)

    def pin(self, device: torch.device | str | None = None) -> None:
        """Page-lock the region for fast, asynchronous host-to-device copies (CUDA only).

        Registered portable, so copies on any device's streams treat it as pinned; the registration
        itself runs in `device`'s context (default: the current device), which it creates if needed.
        A CPU `device` pins nothing.
        """
        on_cpu = device is not None and torch.device(device).type != "cuda"
        if self._pinned or on_cpu or not torch.cuda.is_available():
            return
        with torch.cuda.device(device):
            cudart = torch.cuda.cudart()
            error = cudart.cudaHostRegister(self.tensor.data_ptr(), self.nbytes, HOST_REGISTER_PORTABLE)
        if int(error) != 0:
            raise RuntimeError(f"cudaHostRegister of {self.path} ({self.nbytes} bytes) failed: {error}")
        self._pinned = True

    def close(self) -> None:
        """Unmap the region; the owner also removes the file. Tensors viewing it must be gone."""
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._pinned = False
        del self.tensor
        try:
            self._mmap.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes when it does
        if self.owner:
            self.path.unlink(missing_ok=True)
