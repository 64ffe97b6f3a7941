"""The served models of a simulation: each name mapped to a profiled kind, its ModelSpec and predictor.

A *kind* is one profiled model shape on one device (Qwen2.5-7B on an H100, say); many served models
share a kind (the paper maps 80 models 6:2:2 onto three). Profiles come from the bundled file
(gpu_profiles.json, derived by derive.py) or from any file `aegaeon profile` wrote.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from aegaeon.scheduler.models import ModelSpec
from aegaeon.scheduler.predictor import Predictor, Profile, ProfileStore
from aegaeon.sim.catalog import DEFAULT_MAX_MODEL_LEN, ModelShape, load_catalog
from aegaeon.sim.derive import BUNDLED_PROFILES_FILE

# The paper's main setup: models mapped 6:2:2 onto these three kinds.
PAPER_KINDS = ("Qwen2.5-7B", "Yi-1.5-9B", "Llama-2-13B")
PAPER_MIX = (6.0, 2.0, 2.0)
DEFAULT_GPU = "H100"


@dataclass(frozen=True)
class ModelKind:
    """One profiled shape on one device, or on the `tp` devices of a tensor-parallel instance.

    The scheduler plans a tensor-parallel instance as one unit whose ranks are alike, so its spec is
    one rank's: the weights' shard (what each rank's switch copies) and the KV of its heads.
    """

    name: str
    shape: ModelShape
    profile: Profile
    tp: int = 1

    @property
    def weight_bytes(self) -> int:
        """One rank's weights (all of them on one device)."""
        return self.shape.shard_weight_bytes(self.profile.dtype, self.tp)

    def spec(self, name: str) -> ModelSpec:
        return ModelSpec(
            name=name,
            shape_key=self.shape.shape_key,
            weight_bytes=self.weight_bytes,
            kv_block_bytes=self.shape.kv_block_bytes(self.profile.dtype, self.tp),
            max_model_len=self.shape.max_model_len,
        )


def load_bundled_profiles() -> ProfileStore:
    """The profiles shipped with the simulator (derived from public numbers, see derive.py)."""
    text = resources.files("aegaeon.sim").joinpath(BUNDLED_PROFILES_FILE).read_text()
    return ProfileStore.from_dict(json.loads(text))


def load_profiles(path: str | Path | None) -> ProfileStore:
    """A profile file written by `aegaeon profile`, or the bundled profiles when `path` is None."""
    if path is None:
        return load_bundled_profiles()
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{path}: no such profile file")
    store = ProfileStore.load(path)
    if not len(store):
        raise ValueError(f"{path}: the profile file holds no profiles")
    return store


def available_kinds(store: ProfileStore, device: str, tp: int = 1) -> dict[str, ModelKind]:
    """Every profile of `store` on `device` (profiles of instances of `tp` devices), named by its
    catalogue model when the shape is known."""
    catalog = load_catalog()
    names = {shape.shape_key: (name, shape) for name, shape in catalog.models.items()}
    kinds = {}
    for profile in store:
        if profile.device.lower() != device.lower():
            continue
        name, shape = names.get(profile.shape_key, (profile.shape_key, None))
        if shape is None:
            shape = ModelShape.from_shape_key(profile.shape_key, DEFAULT_MAX_MODEL_LEN)
        kinds[name] = ModelKind(name, shape, profile, tp)
    return kinds


def devices_of(store: ProfileStore) -> list[str]:
    return sorted({p.device for p in store})


def select_kinds(
    store: ProfileStore, device: str, names: Sequence[str] | None, tp: int = 1
) -> list[ModelKind]:
    """The kinds named (catalogue names or shape keys), or all on the device; ValueError if absent."""
    kinds = available_kinds(store, device, tp)
    if not kinds:
        raise ValueError(f"no profile for device {device!r}; the file has: {', '.join(devices_of(store))}")
    if not names:
        return list(kinds.values())
    lowered = {k.lower(): v for k, v in kinds.items()}
    missing = [n for n in names if n.lower() not in lowered]
    if missing:
        raise ValueError(f"no profile for {', '.join(missing)} on {device}; available: {', '.join(kinds)}")
    return [lowered[n.lower()] for n in names]


def assign_kinds(
    models: Sequence[str], kinds: Sequence[ModelKind], mix: Sequence[float]
) -> dict[str, ModelKind]:
    """Map models to kinds in the ratio `mix`, interleaved: each next model goes to the kind most behind."""
    if len(mix) != len(kinds):
        raise ValueError(f"the mix has {len(mix)} parts for {len(kinds)} model kinds")
    if any(part < 0 for part in mix) or sum(mix) <= 0:
        raise ValueError(f"the mix must be non-negative with a positive sum, got {list(mix)}")
    shares = [part / sum(mix) for part in mix]
    counts = [0] * len(kinds)
    assigned = {}
    for index, model in enumerate(models):
        # Ties go to the earlier kind, so the assignment is deterministic.
        k = max(range(len(kinds)), key=lambda j: (shares[j] * (index + 1) - counts[j], -j))
        counts[k] += 1
        assigned[model] = kinds[k]
    return assigned


class ModelSet:
    """The served models: the ModelSpec and the profile of each, by model name.

    `predictor` is the simulated clock: what prefills, decode steps and loads take. `planner` is what
    the scheduler classes predict them to take: the same profiles, unless `planning_profiles` are
    given, as when the simulator replays a real node whose scheduler plans with profiles of
    `engine.step()` alone while its steps take longer (benchmarks/sim_validate.py).
    """

    def __init__(
        self,
        specs: Mapping[str, ModelSpec],
        profiles: Mapping[str, Profile],
        planning_profiles: Mapping[str, Profile] | None = None,
    ) -> None:
        if not specs:
            raise ValueError("a simulation serves at least one model")
        for given in (profiles, planning_profiles if planning_profiles is not None else profiles):
            missing = sorted(set(specs) - set(given))
            if missing:
                raise ValueError(f"no profile for {', '.join(missing)}")
        self.specs = dict(specs)
        self.profiles = {name: profiles[name] for name in self.specs}
        self.predictor = Predictor(self.profiles)
        self.planner = (
            Predictor({name: planning_profiles[name] for name in self.specs})
            if planning_profiles is not None
            else self.predictor
        )
        # Host-device bandwidth implied by each profile: the weights over the measured switch time.
        self._link = {
            name: spec.weight_bytes / p.switch_s if (p := self.profiles[name]).switch_s > 0 else math.inf
            for name, spec in self.specs.items()
        }

    @classmethod
    def from_kinds(cls, kinds: Mapping[str, ModelKind]) -> ModelSet:
        """Served model name -> its kind."""
        return cls(
            {name: kind.spec(name) for name, kind in kinds.items()}, {n: k.profile for n, k in kinds.items()}
        )

    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self):
        return iter(self.specs)

    @property
    def device(self) -> str:
        return next(iter(self.profiles.values())).device

    def weight_bytes(self, model: str) -> int:
        return self.specs[model].weight_bytes

    def largest_weight_bytes(self) -> int:
        return max(spec.weight_bytes for spec in self.specs.values())

    def kv_move_s(self, model: str, tokens: int) -> float:
        """Seconds to move one sequence's KV of `tokens` tokens between device and host."""
        return self.specs[model].kv_bytes(tokens) / self._link[model]


def build_model_set(
    models: Sequence[str],
    store: ProfileStore,
    device: str,
    kind_names: Sequence[str] | None = None,
    mix: Sequence[float] | None = None,
    tp: int = 1,
) -> ModelSet:
    """Served `models` mapped onto the chosen kinds in the ratio `mix` (default: equal parts), each
    served by instances of `tp` devices (`store` holds profiles of such instances)."""
    kinds = select_kinds(store, device, kind_names, tp)
    return ModelSet.from_kinds(assign_kinds(models, kinds, mix or [1.0] * len(kinds)))
