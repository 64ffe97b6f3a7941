"""The rank processes of a tensor-parallel engine: started by rank 0, each runs an engine replica
over its shard and carries out rank 0's calls, in order, until told to stop or rank 0 is gone.

A rank is a fresh interpreter (`python -m aegaeon.engine.parallel.ranks`, its spec pickled on
stdin), like an instance process: no inherited CUDA context, and the user's main script is not run
again. On CUDA rank r uses `cuda:r` of the devices its instance sees.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aegaeon.config import RANK_PARENT_CHECK_S, EngineConfig, MemoryConfig
from aegaeon.engine.parallel.group import GroupAddress, RankGroup

# How long rank 0 gives its ranks to exit after the stop command before killing them.
RANK_STOP_GRACE_S = 5.0
# A rank that cannot carry out one of rank 0's calls exits with this code.
RANK_FAILED_EXIT_CODE = 3


class RankFailure(RuntimeError):
    """A rank of a tensor-parallel engine died or stopped answering: the engine cannot go on."""


@dataclass(frozen=True)
class RankSpec:
    """What a rank process needs to build its engine replica; picklable."""

    models: dict[str, str]
    device: str  # rank 0's device; see rank_device
    dtype: str
    engine: EngineConfig
    memory: MemoryConfig
    model_cache_name: str | None  # the node's host model cache; None: each rank a private one
    address: GroupAddress
    cpu_threads: int | None = None
    kv_pool_name: str | None = None  # the node's host KV pool; None: KV taken off a device is dropped


@dataclass(frozen=True)
class Command:
    """One engine call of rank 0, repeated by every other rank."""

    method: str
    args: tuple[Any, ...] = ()
    # Rank 0's host KV blocks (None: dropped) for the sequences this call takes off the device.
    kv_decisions: dict[int, list[int] | None] | None = None


STOP = Command("stop")


def rank_device(device: str | torch.device, rank: int) -> torch.device:
    """Rank `rank`'s device: `cuda:rank` on CUDA (each rank its own GPU), else the device itself."""
    device = torch.device(device)
    return torch.device("cuda", rank) if device.type == "cuda" else device


class RankProcesses:
    """Ranks 1..size-1 of one engine, as seen from rank 0, and rank 0's own group membership."""

    def __init__(self, spec: RankSpec, processes: list[subprocess.Popen], store_dir: str):
        self.spec = spec
        self.processes = processes
        self._store_dir = store_dir
        self.group: RankGroup | None = None

    @classmethod
    def start(
        cls,
        size: int,
        models: dict[str, str],
        device: str,
        dtype: str,
        engine: EngineConfig,
        memory: MemoryConfig,
        model_cache_name: str | None,
        timeout_s: float,
        cpu_threads: int | None = None,
        kv_pool_name: str | None = None,
    ) -> RankProcesses:
        """Start ranks 1..size-1 and join the group as rank 0 (waits for every rank to join)."""
        store_dir = tempfile.mkdtemp(prefix="aegaeon-tp-")
        address = GroupAddress(str(Path(store_dir) / "store"), size, timeout_s)
        spec = RankSpec(
            models, device, dtype, engine, memory, model_cache_name, address, cpu_threads, kv_pool_name
        )
        processes = []
        for rank in range(1, size):
            process = subprocess.Popen(
                [sys.executable, "-m", "aegaeon.engine.parallel.ranks"], stdin=subprocess.PIPE
            )
            process.stdin.write(pickle.dumps((spec, rank)))
            process.stdin.close()
            processes.append(process)
        ranks = cls(spec, processes, store_dir)
        try:
            ranks.group = RankGroup(address, 0, rank_device(device, 0))
        except BaseException:
            ranks.stop()
            raise
        return ranks

    def check(self) -> None:
        """Raise RankFailure if a rank process has exited."""
        for rank, process in enumerate(self.processes, start=1):
            if process.poll() is not None:
                raise RankFailure(
                    f"rank {rank} (pid {process.pid}) of the tensor-parallel engine exited with code "
                    f"{process.returncode}"
                )

    def send(self, command: Command) -> None:
        """Have every rank carry out `command` (a rank that is gone raises RankFailure)."""
        self.check()
        try:
            self.group.broadcast_object(command)
        except RuntimeError as error:
            self.check()
            raise RankFailure(f"a rank of the tensor-parallel engine stopped answering: {error}") from error

    def stop(self) -> None:
        """Stop every rank (asked, then killed past a grace period) and remove the group's store."""
        if self.group is not None and all(process.poll() is None for process in self.processes):
            try:
                self.group.broadcast_object(STOP)
            except RuntimeError:
                pass
        deadline = time.monotonic() + RANK_STOP_GRACE_S
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self._store_dir, ignore_errors=True)


def _exit_with_parent(parent: int) -> None:
    """Exit at once when rank 0 (this process's parent) is gone: a rank never outlives its engine."""
    while True:
        time.sleep(RANK_PARENT_CHECK_S)
        if os.getppid() != parent:
            os._exit(RANK_FAILED_EXIT_CODE)


def serve_rank(spec: RankSpec, rank: int) -> None:
    """A rank process's main: build the engine replica, then carry out rank 0's calls."""
    from aegaeon.engine.engine import LLMEngine
    from aegaeon.memory.kv_pool import HostKVPool
    from aegaeon.memory.model_cache import HostModelCache

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    device = rank_device(spec.device, rank)
    if spec.cpu_threads is not None and device.type == "cpu":
        torch.set_num_threads(spec.cpu_threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = RankGroup(spec.address, rank, device)
    model_cache = (
        HostModelCache.attach(spec.memory.shm_dir, spec.model_cache_name) if spec.model_cache_name else None
    )
    kv_pool = HostKVPool.attach(spec.memory.shm_dir, spec.kv_pool_name) if spec.kv_pool_name else None
    if kv_pool is not None:
        kv_pool.pin()
    engine = LLMEngine(
        models=spec.models,
        device=device,
        dtype=spec.dtype,
        config=spec.engine,
        memory=spec.memory,
        model_cache=model_cache,
        kv_pool=kv_pool,
        progress=False,
        group=group,
    )
    while True:
        command: Command = group.broadcast_object()
        if command == STOP:
            return
        # Rank 0 checks a call before sending it, so a call failing here means this rank no longer
        # matches rank 0: it exits (the error reaches the main below), and rank 0 fails with it.
        engine.kv.decisions = dict(command.kv_decisions or {})
        getattr(LLMEngine, command.method)(engine, *command.args)


if __name__ == "__main__":
    # Run the importable copy of this module, so the records it reads unpickle under their real names.
    from aegaeon.engine.parallel.ranks import serve_rank as serve_rank_calls

    try:
        serve_rank_calls(*pickle.load(sys.stdin.buffer))
    except BaseException:  # noqa: BLE001 - a rank that cannot go on exits; rank 0 notices
        traceback.print_exc(file=sys.stderr)
        sys.stdout.flush()
        os._exit(RANK_FAILED_EXIT_CODE)
