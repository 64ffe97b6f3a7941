"""Model weights: read HF safetensors into our canonical layout, and the typed view the model runs on.

The canonical layout fuses q/k/v into one `qkv` matrix and gate/up into one `gate_up` matrix, so a
layer runs two large matrix products instead of five small ones. It is a flat `name -> tensor`
mapping (a *state*), which is what a host cache stores and an arena holds; `ModelWeights` is a typed
view over such a state and owns no memory of its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from aegaeon.engine.architecture import Architecture

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


def read_hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under its HF name, as stored (no dtype change)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def canonical_state(
    arch: Architecture, hf: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Rename and fuse HF tensors into the canonical layout, in `dtype`."""

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        return hf[name].to(dtype)

    state = {"embed": take("model.embed_tokens.weight"), "norm": take("model.norm.weight")}
    if not arch.tie_embeddings:
        state["lm_head"] = take("lm_head.weight")
    for i in range(arch.num_layers):
        hf_prefix, prefix = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = hf_prefix + "self_attn.", hf_prefix + "mlp."
        state[prefix + "input_norm"] = take(hf_prefix + "input_layernorm.weight")
        state[prefix + "post_norm"] = take(hf_prefix + "post_attention_layernorm.weight")
        state[prefix + "qkv"] = torch.cat([take(attn + f"{p}_proj.weight") for p in "qkv"])
        state[prefix + "o"] = take(attn + "o_proj.weight")
        state[prefix + "gate_up"] = torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")])
        state[prefix + "down"] = take(mlp + "down_proj.weight")
        if arch.qkv_bias:
            state[prefix + "qkv_bias"] = torch.cat([take(attn + f"{p}_proj.bias") for p in "qkv"])
        if arch.o_bias:
            state[prefix + "o_bias"] = take(attn + "o_proj.bias")
        if arch.mlp_bias:
            state[prefix + "gate_up_bias"] = torch.cat(
                [take(mlp + "gate_proj.bias"), take(mlp + "up_proj.bias")]
            )
            state[prefix + "down_bias"] = take(mlp + "down_proj.bias")
        if arch.qk_norm:
            state[prefix + "q_norm"] = take(attn + "q_norm.weight")
            state[prefix + "k_norm"] = take(attn + "k_norm.weight")
    return state


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


def load_state(model_dir: Path, arch: Architecture, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read a checkpoint from disk straight into the canonical layout."""
    return canonical_state(arch, read_hf_tensors(model_dir), dtype)


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
