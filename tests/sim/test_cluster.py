from __future__ import annotations

import pytest

from aegaeon.sim.cluster import (
    ClusterConfig,
    MemoryConfig,
    NodeLayout,
    colocated_layout,
    colocated_nodes,
    layout_for_gpus,
    split_nodes,
)


def test_paper_layout_and_smaller_pools() -> None:
    assert layout_for_gpus(16) == (NodeLayout(3, 5), NodeLayout(3, 5))
    assert layout_for_gpus(1) == (NodeLayout(colocated=1),)
    assert layout_for_gpus(2) == (NodeLayout(1, 1),)
    assert layout_for_gpus(9) == (NodeLayout(3, 5), NodeLayout(colocated=1))
    assert sum(n.gpus for n in layout_for_gpus(21)) == 21
    assert colocated_layout(10) == (NodeLayout(colocated=8), NodeLayout(colocated=2))


def test_memory_split_leaves_room_for_two_of_the_largest_models() -> None:
    gpu = MemoryConfig(device_bytes=80 * 10**9, fraction=0.9)
    split = gpu.aegaeon_split(26 * 10**9)
    assert split.weight_bytes == 52 * 10**9
    assert split.kv_bytes == 72 * 10**9 - 52 * 10**9
    cpu = MemoryConfig(kv_bytes=1000)
    assert cpu.aegaeon_split(300).weight_bytes == 600
    with pytest.raises(ValueError, match="cannot hold"):
        MemoryConfig(device_bytes=10, fraction=1.0).aegaeon_split(20)


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="either colocated"):
        NodeLayout(prefill=1, decode=1, colocated=1)
    with pytest.raises(ValueError, match="at least one prefill"):
        NodeLayout(prefill=0, decode=3)
    with pytest.raises(ValueError, match="gpus"):
        layout_for_gpus(0)


def test_nodes_split_into_tensor_parallel_instances() -> None:
    # Two 8-GPU nodes of TP=4 instances: two instances each, one prefill and one decode.
    nodes = layout_for_gpus(16, tp=4)
    assert nodes == (NodeLayout(1, 1, tensor_parallel_size=4),) * 2
    assert all(node.instances == 2 and node.gpus == 8 for node in nodes)
    # The paper's 8-GPU node of 3 prefill + 5 decode single-device instances.
    assert layout_for_gpus(8) == (NodeLayout(3, 5),)
    # Nodes of their own sizes; a node of one instance does both.
    assert split_nodes([8, 4], tp=4) == (
        NodeLayout(1, 1, tensor_parallel_size=4),
        NodeLayout(colocated=1, tensor_parallel_size=4),
    )
    assert colocated_nodes([8], tp=2) == (NodeLayout(colocated=4, tensor_parallel_size=2),)
    pool = ClusterConfig(split_nodes([8, 8], tp=4), MemoryConfig(kv_bytes=1))
    assert (pool.gpus, pool.engines, pool.tensor_parallel_size) == (16, 4, 4)
    with pytest.raises(ValueError, match="does not split into instances of 4"):
        split_nodes([8, 6], tp=4)
    with pytest.raises(ValueError, match="same tensor parallel size"):
        ClusterConfig((NodeLayout(1, 1), NodeLayout(1, 1, tensor_parallel_size=2)), MemoryConfig(kv_bytes=1))
