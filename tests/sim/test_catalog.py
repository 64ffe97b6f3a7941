from __future__ import annotations

import pytest

from aegaeon.sim.catalog import ModelShape, load_catalog

# Published parameter counts (billions) of the paper's models.
PUBLISHED_PARAMS = {"Qwen2.5-7B": 7.6, "Yi-1.5-9B": 8.8, "Llama-2-13B": 13.0}


@pytest.mark.parametrize("name, billions", PUBLISHED_PARAMS.items())
def test_catalogue_shapes_have_the_published_sizes(name: str, billions: float) -> None:
    shape = load_catalog().model(name)
    assert shape.num_parameters() / 1e9 == pytest.approx(billions, rel=0.02)
    assert shape.weight_bytes("bfloat16") == 2 * shape.num_parameters()


def test_kv_sizes_follow_grouped_query_attention() -> None:
    catalog = load_catalog()
    # Qwen2.5-7B: 28 layers, 4 KV heads of 128 -> 57,344 bytes per token in bf16; Llama-2-13B has no GQA.
    assert catalog.model("Qwen2.5-7B").kv_bytes_per_token("bfloat16") == 57_344
    assert catalog.model("Llama-2-13B").kv_bytes_per_token("bfloat16") == 819_200
    assert catalog.model("qwen2.5-7b").kv_block_bytes("bfloat16") == 16 * 57_344


def test_shape_key_round_trip_and_errors() -> None:
    shape = load_catalog().model("Yi-1.5-9B")
    again = ModelShape.from_shape_key(shape.shape_key, max_model_len=4096)
    assert again == shape
    with pytest.raises(ValueError, match="not an engine shape key"):
        ModelShape.from_shape_key("llama-7b")


def test_gpu_lookup_by_name_or_device() -> None:
    catalog = load_catalog()
    assert catalog.gpu("h100") is catalog.gpu("NVIDIA H100 80GB HBM3")
    with pytest.raises(KeyError, match="unknown GPU"):
        catalog.gpu("TPU")


def test_the_72b_model_is_listed_at_tensor_parallel_4() -> None:
    catalog = load_catalog()
    shape = catalog.model("Qwen2.5-72B")
    assert shape.num_parameters() / 1e9 == pytest.approx(72.7, rel=0.01)
    assert catalog.default_tensor_parallel("qwen2.5-72b") == 4
    assert catalog.default_tensor_parallel("Qwen2.5-7B") == 1


def test_tensor_parallel_ranks_hold_a_shard_of_weights_and_kv_heads() -> None:
    shape = load_catalog().model("Qwen2.5-72B")  # 64 query heads, 8 KV heads
    assert shape.shard_weight_bytes("bfloat16", 4) == pytest.approx(shape.weight_bytes("bfloat16") / 4, abs=1)
    assert shape.kv_heads_per_rank(4) == 2
    assert shape.kv_bytes_per_token("bfloat16", 4) == shape.kv_bytes_per_token("bfloat16") // 4
    # More ranks than KV heads: each rank keeps a replica of one.
    assert shape.kv_heads_per_rank(16) == 1
    with pytest.raises(ValueError, match="do not split over 3 ranks"):
        shape.shard_weight_bytes("bfloat16", 3)
    with pytest.raises(ValueError, match="must be >= 1"):
        shape.kv_heads_per_rank(0)
