"""The order of a device's copies: KV moves go ahead of weight prefetches.

What a user relies on: a decode turn's swap-in is not stuck behind the next model's weights (a
prefetch of gigabytes): issued while a prefetch copies, it lands first, and both land byte for byte.
On the CPU the copies run in issue order on one copier thread, a KV move cutting in between two
chunks of a weights copy; on CUDA KV moves have a stream of their own at a higher priority.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aegaeon.config import MIB
from aegaeon.memory.copies import CopyStream

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
# A prefetch long enough that the test thread issues the KV move well before it ends, even on a
# machine shared with other jobs (CUDA copies at tens of GB/s: more bytes there).
PREFETCH_BYTES = {"cpu": 256 * MIB, "cuda": 2048 * MIB}
CHUNK_BYTES = 8 * MIB
KV_BYTES = 1 * MIB


def host_bytes(nbytes: int, device: torch.device, fill: int) -> torch.Tensor:
    """Host bytes to copy from (page-locked for a CUDA device, as the host pools are)."""
    return torch.full((nbytes,), fill, dtype=torch.uint8, pin_memory=device.type == "cuda")


def prefetch_chunks(
    device: torch.device,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """A model-sized weights copy in CHUNK_BYTES chunks: the chunks, their target and their source."""
    nbytes = PREFETCH_BYTES[device.type]
    source = host_bytes(nbytes, device, 7)
    target = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    chunks = [
        (target[start : start + CHUNK_BYTES], source[start : start + CHUNK_BYTES])
        for start in range(0, nbytes, CHUNK_BYTES)
    ]
    return chunks, target, source


@pytest.mark.parametrize("device", DEVICES)
def test_a_kv_move_issued_during_a_prefetch_lands_before_it(device: str) -> None:
    device = torch.device(device)
    weights = CopyStream(device)
    kv = CopyStream(device, ahead_of=weights)
    chunks, target, source = prefetch_chunks(device)
    kv_source = host_bytes(KV_BYTES, device, 3)
    kv_target = torch.zeros(KV_BYTES, dtype=torch.uint8, device=device)

    prefetch = weights.copy(chunks, background=True)
    move = kv.copy([(kv_target, kv_source)], background=True)
    move.synchronize()
    assert not prefetch.done(), "the KV move waited for the whole prefetch"
    prefetch.synchronize()
    assert torch.equal(kv_target.cpu(), kv_source)
    assert torch.equal(target.cpu(), source)


def test_copies_of_one_cpu_device_run_in_issue_order() -> None:
    """Two background copies to the same bytes: the one issued last is what remains."""
    device = torch.device("cpu")
    weights = CopyStream(device)
    kv = CopyStream(device, ahead_of=weights)
    target = torch.zeros(64 * MIB, dtype=torch.uint8)
    first = weights.copy([(target, torch.full_like(target, 1))], background=True)
    second = weights.copy([(target, torch.full_like(target, 2))], background=True)
    second.wait()
    assert first.done() and bool((target == 2).all())
    # A KV move waited for inline while the copier is idle runs at once, on the caller's thread.
    small = torch.zeros(KV_BYTES, dtype=torch.uint8)
    assert kv.copy([(small, torch.full_like(small, 5))]).done() and bool((small == 5).all())


@pytest.mark.parametrize("device", DEVICES)
def test_a_kv_move_of_byte_runs_issued_during_a_prefetch_lands_first_run_by_run(device: str) -> None:
    """A swap's runs (blocks of many requests, as offsets into two byte regions) cut in ahead of a
    prefetch, and each run lands where it was sent."""
    device = torch.device(device)
    weights = CopyStream(device)
    kv = CopyStream(device, ahead_of=weights)
    chunks, target, source = prefetch_chunks(device)
    kv_source = torch.arange(KV_BYTES, dtype=torch.int64).remainder(251).to(torch.uint8)
    kv_source = kv_source.pin_memory() if device.type == "cuda" else kv_source
    kv_target = torch.zeros(KV_BYTES, dtype=torch.uint8, device=device)
    quarter = KV_BYTES // 4
    # The source's quarters land in the order 3, 0, 2; the target's last quarter is not written.
    runs = np.array([[0, 3 * quarter, quarter], [quarter, 0, quarter], [2 * quarter, 2 * quarter, quarter]])

    prefetch = weights.copy(chunks, background=True)
    kv.copy_runs(kv_target, kv_source, runs).synchronize()
    assert not prefetch.done(), "the KV move waited for the whole prefetch"
    prefetch.synchronize()
    expected = torch.cat(
        [kv_source[3 * quarter :], kv_source[:quarter], kv_source[2 * quarter : 3 * quarter]]
    )
    assert torch.equal(kv_target.cpu()[: 3 * quarter], expected)
    assert not kv_target.cpu()[3 * quarter :].any()
    assert torch.equal(target.cpu(), source)
