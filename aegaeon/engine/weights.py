"""Model weights: HF safetensors mapped onto our canonical layout, and the typed view the model runs on.

The canonical layout fuses q/k/v into one `qkv` matrix and gate/up into one `gate_up` matrix, so a
layer runs two large matrix products instead of five small ones. It is a flat `name -> tensor`
mapping (a *state*), which is what a host cache stores and an arena holds; `ModelWeights` is a typed
view over such a state and owns no memory of its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from aegaeon.engine.architecture import Architecture
from aegaeon.memory.arena import dtype_size
from aegaeon.memory.checkpoint import Piece, StoredTensor, read_header
from aegaeon.memory.model_cache import TensorSlot

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# What a hub download fetches: configs, weights and tokenizer files, never pickled checkpoints.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A supported dtype from its name (`"bfloat16"`) or itself."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; supported: {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local model directory, or a hub id downloaded (config, safetensors, tokenizer) when online."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {name_or_path} is not a directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as error:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise FileNotFoundError(
            f"{name_or_path!r} is not a local directory and could not be fetched from the hub ({error})"
        ) from error


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    single = model_dir / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors weights in {model_dir} (.bin checkpoints are not supported)")
    return found


def canonical_sources(arch: Architecture) -> dict[str, tuple[str, ...]]:
    """The HF tensors each canonical tensor is made of, concatenated along their first dimension."""
    sources: dict[str, tuple[str, ...]] = {
        "embed": ("model.embed_tokens.weight",),
        "norm": ("model.norm.weight",),
    }
    if not arch.tie_embeddings:
        sources["lm_head"] = ("lm_head.weight",)
    for i in range(arch.num_layers):
        hf_prefix, prefix = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = hf_prefix + "self_attn.", hf_prefix + "mlp."
        sources[prefix + "input_norm"] = (hf_prefix + "input_layernorm.weight",)
        sources[prefix + "post_norm"] = (hf_prefix + "post_attention_layernorm.weight",)
        sources[prefix + "qkv"] = tuple(attn + f"{p}_proj.weight" for p in "qkv")
        sources[prefix + "o"] = (attn + "o_proj.weight",)
        sources[prefix + "gate_up"] = (mlp + "gate_proj.weight", mlp + "up_proj.weight")
        sources[prefix + "down"] = (mlp + "down_proj.weight",)
        if arch.qkv_bias:
            sources[prefix + "qkv_bias"] = tuple(attn + f"{p}_proj.bias" for p in "qkv")
        if arch.o_bias:
            sources[prefix + "o_bias"] = (attn + "o_proj.bias",)
        if arch.mlp_bias:
            sources[prefix + "gate_up_bias"] = (mlp + "gate_proj.bias", mlp + "up_proj.bias")
            sources[prefix + "down_bias"] = (mlp + "down_proj.bias",)
        if arch.qk_norm:
            sources[prefix + "q_norm"] = (attn + "q_norm.weight",)
            sources[prefix + "k_norm"] = (attn + "k_norm.weight",)
    return sources


def canonical_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the canonical state, from the architecture alone (no file read)."""
    hidden, inter, qkv = arch.hidden_size, arch.intermediate_size, arch.q_size + 2 * arch.kv_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (arch.vocab_size, hidden), "norm": (hidden,)}
    if not arch.tie_embeddings:
        shapes["lm_head"] = (arch.vocab_size, hidden)
    for i in range(arch.num_layers):
        prefix = f"layers.{i}."
        shapes[prefix + "input_norm"] = (hidden,)
        shapes[prefix + "post_norm"] = (hidden,)
        shapes[prefix + "qkv"] = (qkv, hidden)
        shapes[prefix + "o"] = (hidden, arch.q_size)
        shapes[prefix + "gate_up"] = (2 * inter, hidden)
        shapes[prefix + "down"] = (hidden, inter)
        if arch.qkv_bias:
            shapes[prefix + "qkv_bias"] = (qkv,)
        if arch.o_bias:
            shapes[prefix + "o_bias"] = (hidden,)
        if arch.mlp_bias:
            shapes[prefix + "gate_up_bias"] = (2 * inter,)
            shapes[prefix + "down_bias"] = (hidden,)
        if arch.qk_norm:
            shapes[prefix + "q_norm"] = (arch.head_dim,)
            shapes[prefix + "k_norm"] = (arch.head_dim,)
    return shapes


def checkpoint_pieces(
    model_dir: Path, arch: Architecture, dtype: torch.dtype, slots: Sequence[TensorSlot]
) -> list[Piece]:
    """Where every HF tensor of the checkpoint goes in a model laid out as `slots` (canonical names
    at byte offsets, see `memory/model_cache.plan_layout`), in `dtype`; reads only the headers.

    A canonical tensor is its sources back to back (a concatenation along the first dimension is
    exactly that in row-major memory), so each source is one piece at a byte offset.
    """
    stored: dict[str, StoredTensor] = {}
    for file in checkpoint_files(model_dir):
        stored.update(read_header(file))
    shapes, sources = canonical_shapes(arch), canonical_sources(arch)
    pieces = []
    for slot in slots:
        offset, rows = slot.offset, 0
        for name in sources[slot.name]:
            if name not in stored:
                raise ValueError(f"checkpoint {model_dir} is missing tensor {name!r}")
            tensor = stored[name]
            if tensor.shape[1:] != shapes[slot.name][1:] or not tensor.shape:
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {list(tensor.shape)}, which does not fit "
                    f"{slot.name} {list(shapes[slot.name])} of this architecture"
                )
            pieces.append(Piece(tensor, offset, dtype))
            offset += math.prod(tensor.shape) * dtype_size(dtype)
            rows += tensor.shape[0]
        if rows != shapes[slot.name][0]:
            raise ValueError(
                f"checkpoint tensors {list(sources[slot.name])} hold {rows} rows; {slot.name} needs "
                f"{shapes[slot.name][0]}"
            )
    return pieces


@dataclass
class LayerWeights:
    """One decoder layer's tensors (views into a state)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


@dataclass
class ModelWeights:
    """The typed view the model runs on; `lm_head` is `embed` itself when embeddings are tied."""

    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor

    @classmethod
    def from_state(cls, arch: Architecture, state: dict[str, torch.Tensor]) -> ModelWeights:
        layers = []
        for i in range(arch.num_layers):
            prefix = f"layers.{i}."
            layers.append(
                LayerWeights(
                    input_norm=state[prefix + "input_norm"],
                    qkv=state[prefix + "qkv"],
                    qkv_bias=state.get(prefix + "qkv_bias"),
                    q_norm=state.get(prefix + "q_norm"),
                    k_norm=state.get(prefix + "k_norm"),
                    o=state[prefix + "o"],
                    o_bias=state.get(prefix + "o_bias"),
                    post_norm=state[prefix + "post_norm"],
                    gate_up=state[prefix + "gate_up"],
                    gate_up_bias=state.get(prefix + "gate_up_bias"),
                    down=state[prefix + "down"],
                    down_bias=state.get(prefix + "down_bias"),
                )
            )
        lm_head = state["embed"] if arch.tie_embeddings else state["lm_head"]
        return cls(embed=state["embed"], layers=layers, norm=state["norm"], lm_head=lm_head)

    def matrices(self) -> Iterator[torch.Tensor]:
        """The weight matrices one forward pass multiplies by, in order (for the compute ceiling)."""
        for layer in self.layers:
            yield from (layer.qkv, layer.o, layer.gate_up, layer.down)
        yield self.lm_head
