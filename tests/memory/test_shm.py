"""Shared-memory regions left by a node that was killed are found by their owner's pid and removed."""

from __future__ import annotations

import os
import subprocess
import sys

from aegaeon.memory.shm import node_region_name, remove_orphans


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_regions_of_dead_owners_are_removed_and_live_ones_kept(tmp_path):
    gone = dead_pid()
    orphans = [tmp_path / f"aegaeon-kv-{gone}-abcd", tmp_path / f"aegaeon-models-{gone}-abcd.index.json"]
    mine = tmp_path / node_region_name("kv", "ef01")
    unrelated = [tmp_path / "aegaeon-kv-pool-test-x", tmp_path / "other-file"]
    for path in [*orphans, mine, *unrelated]:
        path.write_bytes(b"x")
    assert str(os.getpid()) in mine.name
    assert sorted(remove_orphans(tmp_path)) == sorted(orphans)
    assert not any(path.exists() for path in orphans)
    assert mine.exists() and all(path.exists() for path in unrelated)
