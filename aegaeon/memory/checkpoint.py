"""Reading safetensors files straight into host memory at disk speed.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the raw bytes. A tensor stored in the dtype it is wanted in is
read with `os.preadv` directly into its place in the destination (the host model cache's shared
memory): no intermediate tensor, no extra copy. Pieces adjacent both in a file and in the
destination are merged, the result is cut into reads of at most `chunk_bytes`, and a pool of
threads issues them (preadv releases the GIL), so a fast disk has several requests in flight. A
tensor stored in another dtype is read into a scratch buffer and converted into place.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from aegaeon.memory.arena import dtype_size

HEADER_LENGTH_BYTES = 8
# Tensor dtypes as safetensors names them.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are in a safetensors file."""

    path: Path
    offset: int  # of its first byte in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """A stored tensor and where its elements go in the destination, in `dtype`."""

    source: StoredTensor
    target: int  # byte offset in the destination
    dtype: torch.dtype

    @property
    def direct(self) -> bool:
        """Whether its bytes are copied as they are (no conversion)."""
        return self.source.dtype == self.dtype


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, by name (reads only the header)."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(HEADER_LENGTH_BYTES)
        if len(prefix) < HEADER_LENGTH_BYTES:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        if HEADER_LENGTH_BYTES + length > size:
            raise ValueError(f"{path} is not a safetensors file (header length {length} past its end)")
        header = json.loads(file.read(length))
    data_start = HEADER_LENGTH_BYTES + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
        if end - begin != math.prod(shape) * dtype_size(dtype) or data_start + end > size:
            raise ValueError(
                f"{path}: tensor {name}'s byte range {begin}..{end} does not fit its shape or file"
            )
        tensors[name] = StoredTensor(path, data_start + begin, end - begin, dtype, shape)
    return tensors


@dataclass(frozen=True)
class _Read:
    path: Path
    offset: int
    target: int
    nbytes: int


def _direct_reads(pieces: Sequence[Piece], chunk_bytes: int) -> list[_Read]:
    """Merge pieces contiguous in both file and destination, then cut into chunks."""
    runs: list[_Read] = []
    for piece in sorted(pieces, key=lambda p: (str(p.source.path), p.source.offset)):
        source = piece.source
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.path == source.path
            and last.offset + last.nbytes == source.offset
            and last.target + last.nbytes == piece.target
        ):
            runs[-1] = _Read(last.path, last.offset, last.target, last.nbytes + source.nbytes)
        else:
            runs.append(_Read(source.path, source.offset, piece.target, source.nbytes))
    return [
        _Read(run.path, run.offset + start, run.target + start, min(chunk_bytes, run.nbytes - start))
        for run in runs
        for start in range(0, run.nbytes, chunk_bytes)
    ]


def _pread_into(descriptor: int, buffer: memoryview, offset: int) -> None:
    """Fill `buffer` from the file at `offset` (reads may come back short)."""
    done = 0
    while done < len(buffer):
        count = os.preadv(descriptor, [buffer[done:]], offset + done)
        if count == 0:
            raise EOFError(f"the file ended {len(buffer) - done} bytes early")
        done += count


def read_pieces(
    pieces: Sequence[Piece],
    destination: torch.Tensor,
    threads: int,
    chunk_bytes: int,
    progress: Callable[[int], None] = lambda nbytes: None,
) -> None:
    """Read every piece into `destination` (uint8, CPU, contiguous); `progress(bytes)` as reads end."""
    target = destination.numpy()  # the same memory, as a writable buffer preadv can fill
    files = {piece.source.path for piece in pieces}
    descriptors = {path: os.open(path, os.O_RDONLY) for path in files}
    try:
        for descriptor in descriptors.values():
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_SEQUENTIAL)

        def direct(read: _Read) -> None:
            with memoryview(target[read.target : read.target + read.nbytes]) as buffer:
                _pread_into(descriptors[read.path], buffer, read.offset)
            progress(read.nbytes)

        def converted(piece: Piece) -> None:
            source = piece.source
            scratch = torch.empty(source.nbytes, dtype=torch.uint8)
            with memoryview(scratch.numpy()) as buffer:
                _pread_into(descriptors[source.path], buffer, source.offset)
            nbytes = math.prod(source.shape) * dtype_size(piece.dtype)
            place = destination[piece.target : piece.target + nbytes].view(piece.dtype)
            place.copy_(scratch.view(source.dtype).view(-1))
            progress(nbytes)

        reads = _direct_reads([piece for piece in pieces if piece.direct], chunk_bytes)
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="disk-read") as pool:
            jobs = [pool.submit(direct, read) for read in reads]
            jobs += [pool.submit(converted, piece) for piece in pieces if not piece.direct]
            for job in jobs:
                job.result()  # the first failure is raised here
    finally:
        for descriptor in descriptors.values():
            os.close(descriptor)
