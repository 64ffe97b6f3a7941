"""Public facts the simulator starts from: model shapes and GPU specifications (catalog.json).

A `ModelShape` is the torch-free twin of the engine's `Architecture` shape: enough to name its
profile (`shape_key`, the same string the engine makes) and to size its weights and KV blocks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from aegaeon.scheduler.models import BLOCK_SIZE

CATALOG_FILE = "catalog.json"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# A shape key made by the engine:
# family-h{hidden}-l{layers}-q{heads}-kv{kv heads}-d{head dim}-i{intermediate}-v{vocab}.
SHAPE_KEY = re.compile(
    r"^(?P<family>[a-z0-9_.]+)-h(?P<hidden>\d+)-l(?P<layers>\d+)-q(?P<heads>\d+)-kv(?P<kv>\d+)"
    r"-d(?P<head_dim>\d+)-i(?P<inter>\d+)-v(?P<vocab>\d+)$"
)
# Context length assumed for a profiled shape whose model config the simulator has not seen.
DEFAULT_MAX_MODEL_LEN = 4096


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape (Llama, Mistral, Qwen2, Qwen3 families)."""

    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool = False
    max_model_len: int = DEFAULT_MAX_MODEL_LEN

    @property
    def shape_key(self) -> str:
        """The engine's `Architecture.shape_key` for this shape (profiles are keyed by it)."""
        return (
            f"{self.family}-h{self.hidden_size}-l{self.num_layers}-q{self.num_heads}"
            f"-kv{self.num_kv_heads}-d{self.head_dim}-i{self.intermediate_size}-v{self.vocab_size}"
        )

    @classmethod
    def from_shape_key(cls, key: str, max_model_len: int = DEFAULT_MAX_MODEL_LEN) -> ModelShape:
        """Read a shape back from its key (embeddings taken as untied: the larger, conservative size)."""
        match = SHAPE_KEY.match(key)
        if match is None:
            raise ValueError(f"not an engine shape key: {key!r}")
        g = match.groupdict()
        return cls(
            g["family"],
            int(g["hidden"]),
            int(g["layers"]),
            int(g["heads"]),
            int(g["kv"]),
            int(g["head_dim"]),
            int(g["inter"]),
            int(g["vocab"]),
            max_model_len=max_model_len,
        )

    def num_parameters(self) -> int:
        """Parameters: attention (q, k, v, o), a gated MLP, and the embeddings (norms are negligible)."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attention = self.hidden_size * (q + 2 * kv) + q * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.num_layers * (attention + mlp) + embeddings

    def weight_bytes(self, dtype: str) -> int:
        return self.num_parameters() * dtype_bytes(dtype)

    def check_tensor_parallel(self, tp: int) -> None:
        """ValueError unless `tp` ranks can shard this shape Megatron-style.

        Query heads split evenly; KV heads split evenly, or, when fewer than the ranks, each rank
        holds a replica of one (the ranks must then be a multiple of the KV heads), as vLLM requires.
        """
        if tp < 1:
            raise ValueError(f"tensor parallel size must be >= 1, got {tp}")
        if self.num_heads % tp:
            raise ValueError(f"{self.num_heads} attention heads do not split over {tp} ranks")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            raise ValueError(f"{self.num_kv_heads} KV heads neither split over nor replicate to {tp} ranks")

    def kv_heads_per_rank(self, tp: int = 1) -> int:
        """KV heads each rank holds: its share, or one replica when there are fewer heads than ranks."""
        self.check_tensor_parallel(tp)
        return max(self.num_kv_heads // tp, 1)

    def shard_weight_bytes(self, dtype: str, tp: int = 1) -> int:
        """One rank's weights: every matrix split over the ranks (the vocabulary too), rounded up."""
        self.check_tensor_parallel(tp)
        return -(-self.weight_bytes(dtype) // tp)

    def kv_bytes_per_token(self, dtype: str, tp: int = 1) -> int:
        """K and V of every layer for one token (on one rank of `tp`)."""
        return 2 * self.num_layers * self.kv_heads_per_rank(tp) * self.head_dim * dtype_bytes(dtype)

    def kv_block_bytes(self, dtype: str, tp: int = 1) -> int:
        return BLOCK_SIZE * self.kv_bytes_per_token(dtype, tp)


@dataclass(frozen=True)
class GPUSpec:
    """The public numbers of one accelerator the latency model is derived from."""

    name: str
    device: str  # the name `aegaeon profile` keys its profiles by (torch.cuda.get_device_name)
    memory_bytes: int
    hbm_bytes_per_s: float
    bf16_flops: float
    # The host link's bandwidth per direction (its datasheet figure); derive.py applies the share of
    # it a model load or KV swap reaches.
    host_link_bytes_per_s: float
    # GPU-to-GPU bandwidth per direction inside a node (NVLink), which tensor-parallel all-reduces use.
    nvlink_bytes_per_s: float = 0.0
    source: str = ""


@dataclass(frozen=True)
class Catalog:
    gpus: dict[str, GPUSpec]
    models: dict[str, ModelShape]
    sources: dict[str, str]
    # Ranks a catalogue model is served on unless told otherwise (1: one device).
    tensor_parallel: dict[str, int] = field(default_factory=dict)

    def gpu(self, name: str) -> GPUSpec:
        for key, spec in self.gpus.items():
            if name.lower() in (key.lower(), spec.device.lower()):
                return spec
        raise KeyError(f"unknown GPU {name!r}; known: {', '.join(self.gpus)}")

    def model(self, name: str) -> ModelShape:
        for key, shape in self.models.items():
            if name.lower() == key.lower():
                return shape
        raise KeyError(f"unknown model {name!r}; known: {', '.join(self.models)}")

    def default_tensor_parallel(self, name: str) -> int:
        """The ranks the catalogue serves model `name` on (1 for a shape it does not list)."""
        for key, tp in self.tensor_parallel.items():
            if name.lower() == key.lower():
                return tp
        return 1


@cache
def load_catalog() -> Catalog:
    """The bundled catalogue (read once)."""
    data = json.loads(resources.files("aegaeon.sim").joinpath(CATALOG_FILE).read_text())
    gpus = {
        name: GPUSpec(
            name=name,
            device=g["device"],
            memory_bytes=int(g["memory_bytes"]),
            hbm_bytes_per_s=float(g["hbm_bytes_per_s"]),
            bf16_flops=float(g["bf16_flops"]),
            host_link_bytes_per_s=float(g["host_link_bytes_per_s"]),
            nvlink_bytes_per_s=float(g.get("nvlink_bytes_per_s", 0.0)),
            source=g.get("source", ""),
        )
        for name, g in data["gpus"].items()
    }
    fields = ModelShape.__dataclass_fields__
    models = {
        name: ModelShape(**{k: v for k, v in m.items() if k in fields}) for name, m in data["models"].items()
    }
    sources = {name: m.get("source", "") for name, m in data["models"].items()}
    sources.update({name: g.source for name, g in gpus.items()})
    tensor_parallel = {name: int(m.get("tensor_parallel_size", 1)) for name, m in data["models"].items()}
    return Catalog(gpus, models, sources, tensor_parallel)
