"""The process group of one tensor-parallel instance, passed explicitly to whatever communicates.

Two torch.distributed process groups are built directly from a shared store (no default group, no
module state): `device` runs the model's collectives on the ranks' devices (gloo on the CPU, NCCL
on CUDA), `control` carries rank 0's commands and sampled tokens as bytes on the CPU (gloo), as
vLLM's CPU group does. Every collective has a timeout: a rank that stops answering fails its peers
instead of hanging them.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from aegaeon.engine.parallel.shards import Shard, vocab_range


@dataclass(frozen=True)
class GroupAddress:
    """Where the ranks of a group meet: a file store every rank opens, and the group's size."""

    store_path: str
    size: int
    timeout_s: float


class RankGroup:
    """One rank's view of its tensor-parallel group: all-reduce, vocab gather and broadcasts."""

    def __init__(self, address: GroupAddress, rank: int, device: torch.device):
        self.shard = Shard(rank, address.size)
        self.device = device
        timeout = timedelta(seconds=address.timeout_s)
        store = dist.FileStore(address.store_path, address.size)
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, address.size, timeout)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.devices = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, address.size, options)
        else:
            self.devices = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, address.size, timeout)

    @property
    def rank(self) -> int:
        return self.shard.rank

    @property
    def size(self) -> int:
        return self.shard.size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` (contiguous) over the ranks, in place; returns it."""
        self.devices.allreduce([tensor]).wait()
        return tensor

    def gather_vocab(self, part: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Every rank's `[rows, its vocab rows]` logits side by side: `[rows, vocab_size]`."""
        ranges = [vocab_range(vocab_size, Shard(rank, self.size)) for rank in range(self.size)]
        widths = [end - start for start, end in ranges]
        padded = part
        if part.shape[-1] < widths[0]:  # the last part is shorter: all parts travel at one width
            padded = torch.nn.functional.pad(part, (0, widths[0] - part.shape[-1]))
        padded = padded.contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        self.devices.allgather([parts], [padded]).wait()
        return torch.cat([p[..., :width] for p, width in zip(parts, widths, strict=True)], dim=-1)

    def barrier(self) -> None:
        """Return once every rank has got here."""
        self.control.allreduce([torch.zeros(1)]).wait()

    def broadcast_object(self, value: Any = None) -> Any:
        """Rank 0's `value`, on every rank (the other ranks pass nothing)."""
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)
            length = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            length = torch.empty(1, dtype=torch.int64)
        self.control.broadcast([length], dist.BroadcastOptions()).wait()
        if self.rank != 0:
            payload = torch.empty(int(length.item()), dtype=torch.uint8)
        self.control.broadcast([payload], dist.BroadcastOptions()).wait()
        return value if self.rank == 0 else pickle.loads(payload.numpy().tobytes())
