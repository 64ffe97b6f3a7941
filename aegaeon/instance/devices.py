"""The device layout of a node: which devices each instance process owns, and the environment it sees.

A node owns a list of devices: GPUs by ordinal (`cuda:0` .. `cuda:7`, as the node itself sees them),
or CPU "devices" (`cpu:0`, `cpu:1`: each one an even share of the node's cores). Each instance gets
`tensor_parallel_size` distinct devices, in order; when the node has fewer devices than the instances
need, instances share them round-robin and split each shared device's memory and threads explicitly.

An instance process sees only its own devices: on CUDA through `CUDA_VISIBLE_DEVICES` (so its engine,
and rank r of a tensor-parallel instance, uses the local `cuda:r`), on the CPU through the cores it
is bound to. `AEGAEON_DEVICES` names the node's devices it owns, for logs and for whoever inspects the
process. Nothing here imports torch: the configuration validates device lists with it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

CPU, CUDA = "cpu", "cuda"
# What an instance process is started with (besides the node's own environment).
VISIBLE_DEVICES_ENV = "CUDA_VISIBLE_DEVICES"
DEVICES_ENV = "AEGAEON_DEVICES"  # the node's names of the instance's devices: "cuda:3", "cpu:1"
CPU_CORES_ENV = "AEGAEON_CPU_CORES"  # the cores an instance on CPU devices is bound to: "0-7"

_RANGE = re.compile(r"^(\d+)-(\d+)$")
_NAMED = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def parse_devices(spec: str | int | Iterable[str | int], device_type: str) -> tuple[str, ...]:
    """A device list spec as the node's device names, in order.

    `spec` is a string of comma-separated items (`0-7`, `0,2,4`, `cuda:1`, `cpu,cpu`, `cpu:0,cpu:1`),
    one GPU ordinal, or a list of items (a YAML list). Bare ordinals and ranges are GPUs; each bare
    `cpu` is the next CPU device. ValueError if the list is empty, names a device twice, or names
    devices of another type than `device_type` (the node's `device`, "cpu" or "cuda").
    """
    if isinstance(spec, bool):
        raise ValueError(f"devices must be a list of devices, got {spec!r}")
    if isinstance(spec, int):
        items = [str(spec)]
    elif isinstance(spec, str):
        items = spec.split(",")
    else:
        items = [str(item) for item in spec]
    names: list[str] = []
    cpus = 0
    for item in (item.strip() for item in items):
        if match := _RANGE.match(item):
            first, last = int(match.group(1)), int(match.group(2))
            if last < first:
                raise ValueError(f"device range {item!r} runs backwards")
            names += [f"{CUDA}:{index}" for index in range(first, last + 1)]
        elif item.isdigit():
            names.append(f"{CUDA}:{int(item)}")
        elif match := _NAMED.match(item):
            kind, index = match.group(1), match.group(2)
            if index is None and kind == CPU:
                index = cpus
            elif index is None:
                raise ValueError(f"name GPUs by ordinal ({item}:0, or just 0), got {item!r}")
            cpus += kind == CPU
            names.append(f"{kind}:{int(index)}")
        else:
            raise ValueError(
                f"cannot read device {item!r} in {spec!r}: give GPU ordinals (0-7, 0,2,4, cuda:1) or cpu,cpu"
            )
    if not names:
        raise ValueError("devices lists no device")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"devices lists {', '.join(repeated)} more than once")
    kinds = {name.split(":")[0] for name in names}
    if kinds != {device_type}:
        raise ValueError(
            f"devices {', '.join(names)} are not all {device_type} devices: the node's device is "
            f"{device_type!r} (set device to {'/'.join(sorted(kinds))} to use them)"
        )
    return tuple(names)


def device_type(device: str) -> str:
    """ "cuda" of "cuda" and "cuda:1", "cpu" of "cpu"."""
    return device.split(":")[0]


def visible_gpus() -> int:
    """How many GPUs the node sees (CUDA_VISIBLE_DEVICES applied), without creating a CUDA context."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def node_devices(
    device: str,
    devices: Sequence[str] | None,
    tensor_parallel_size: int = 1,
    gpu_count: int | None = None,
) -> tuple[str, ...]:
    """The devices a node owns: those configured, else every visible GPU on CUDA, and on the CPU one
    device per tensor-parallel rank (one, without tensor parallelism).

    A `device` naming one GPU (`cuda:1`) without a device list owns that GPU. `gpu_count` is how many
    GPUs are visible (None: counted now). ValueError if a GPU listed is not visible, or none is.
    """
    kind = device_type(device)
    if kind != CUDA:
        return tuple(devices) if devices else tuple(f"{kind}:{rank}" for rank in range(tensor_parallel_size))
    count = visible_gpus() if gpu_count is None else gpu_count
    if devices:
        chosen = tuple(devices)
    elif ":" in device:
        chosen = (device,)
    else:
        chosen = tuple(f"{CUDA}:{index}" for index in range(count))
    if not chosen:
        raise ValueError("the node's device is cuda, but no GPU is visible (check CUDA_VISIBLE_DEVICES)")
    missing = [name for name in chosen if int(name.split(":")[1]) >= count]
    if missing:
        raise ValueError(
            f"devices {', '.join(missing)} are not visible: this node sees {count} GPU(s)"
            + (f" (cuda:0 .. cuda:{count - 1})" if count else "")
        )
    return chosen


@dataclass(frozen=True)
class InstanceDevices:
    """One instance's share of the node's devices, and the environment its process starts with."""

    name: str
    devices: tuple[str, ...]  # the node's names: ("cuda:3",), ("cuda:0", "cuda:1"), ("cpu:1",)
    # What its engine (rank r: local_devices[r]) uses inside its process: "cuda:0" .., or "cpu".
    local_devices: tuple[str, ...]
    # Instances (this one included) on its most shared device: its memory is split that many ways.
    sharers: int
    env: dict[str, str] = field(default_factory=dict)
    cpu_threads: int | None = None  # torch threads of each rank on CPU devices (None on GPUs)

    @property
    def device(self) -> str:
        """The local device of its engine (rank 0's)."""
        return self.local_devices[0]


def layout_instances(
    devices: Sequence[str],
    names: Sequence[str],
    tensor_parallel_size: int = 1,
    cpu_cores: Sequence[int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[InstanceDevices]:
    """Give each instance (in `names` order: prefill ones first) `tensor_parallel_size` distinct devices.

    With enough devices every instance gets its own; with fewer they are dealt round-robin, so
    instances share devices as evenly as they can (each instance's devices still distinct).
    `cpu_cores` are the cores CPU devices split (None: those this process may run on); `environ` is
    the node's environment, whose CUDA_VISIBLE_DEVICES (if set) maps the node's ordinals to the
    GPUs the instances are shown. ValueError if an instance needs more devices than the node has.
    """
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if not devices:
        raise ValueError("a node needs at least one device")
    if tensor_parallel_size > len(devices):
        raise ValueError(
            f"tensor_parallel_size {tensor_parallel_size} needs {tensor_parallel_size} distinct devices "
            f"per instance; the node has {len(devices)} ({', '.join(devices)})"
        )
    kind = device_type(devices[0])
    per_instance = [
        tuple(
            devices[(index * tensor_parallel_size + rank) % len(devices)]
            for rank in range(tensor_parallel_size)
        )
        for index in range(len(names))
    ]
    sharers = {device: sum(device in owned for owned in per_instance) for device in devices}
    environ = os.environ if environ is None else environ
    if kind == CPU:
        cores = sorted(os.sched_getaffinity(0)) if cpu_cores is None else list(cpu_cores)
        device_cores = _split_cores(cores, devices)
    layout = []
    for name, owned in zip(names, per_instance, strict=True):
        env = {DEVICES_ENV: ",".join(owned)}
        shared = max(sharers[device] for device in owned)
        if kind == CUDA:
            visible = _visible_entries(environ)
            env[VISIBLE_DEVICES_ENV] = ",".join(_map_ordinal(device, visible) for device in owned)
            local = tuple(f"{CUDA}:{rank}" for rank in range(len(owned)))
            threads = None
        elif kind == CPU:
            owned_cores = sorted({core for device in owned for core in device_cores[device]})
            env[CPU_CORES_ENV] = format_cores(owned_cores)
            local = (kind,) * len(owned)
            # Each rank's threads: its device's cores over the instances sharing it.
            threads = max(1, min(len(device_cores[device]) for device in owned) // shared)
        else:  # another accelerator: the device itself, shared as it is
            local, threads = (kind,) * len(owned), None
        layout.append(InstanceDevices(name, owned, local, shared, env, threads))
    return layout


def _split_cores(cores: Sequence[int], devices: Sequence[str]) -> dict[str, list[int]]:
    """Each CPU device's cores: an even, contiguous share (one core each, reused, if there are fewer)."""
    if len(cores) < len(devices):
        return {device: [cores[index % len(cores)]] for index, device in enumerate(devices)}
    count = len(devices)
    return {
        device: list(cores[index * len(cores) // count : (index + 1) * len(cores) // count])
        for index, device in enumerate(devices)
    }


def _visible_entries(environ: Mapping[str, str]) -> list[str] | None:
    """The node's own CUDA_VISIBLE_DEVICES entries (ordinals, UUIDs or MIG ids); None if unset."""
    value = environ.get(VISIBLE_DEVICES_ENV)
    if value is None:
        return None
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def _map_ordinal(device: str, visible: list[str] | None) -> str:
    """What CUDA_VISIBLE_DEVICES calls the node's `cuda:N` (the node may see a subset itself)."""
    ordinal = int(device.split(":")[1])
    if visible is None:
        return str(ordinal)
    if ordinal >= len(visible):
        raise ValueError(
            f"{device} is not among the GPUs this node sees (CUDA_VISIBLE_DEVICES={','.join(visible)})"
        )
    return visible[ordinal]


def format_cores(cores: Iterable[int]) -> str:
    """Cores as a list of ranges: [0, 1, 2, 5] -> "0-2,5" (the format of /proc's Cpus_allowed_list)."""
    runs: list[list[int]] = []
    for core in sorted(set(cores)):
        if runs and runs[-1][1] == core - 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


def parse_cores(text: str) -> list[int]:
    """The cores of a ranges list ("0-2,5" -> [0, 1, 2, 5])."""
    cores: list[int] = []
    for part in filter(None, (part.strip() for part in text.split(","))):
        first, _, last = part.partition("-")
        cores += range(int(first), int(last or first) + 1)
    return cores


def bind_to_devices(device: str, environ: Mapping[str, str] | None = None) -> None:
    """In an instance process, before anything touches its device: run on its cores, or make its GPU
    current (host memory is then pinned in that GPU's context)."""
    environ = os.environ if environ is None else environ
    cores = environ.get(CPU_CORES_ENV)
    if cores:
        os.sched_setaffinity(0, parse_cores(cores))
    if device_type(device) == CUDA:
        import torch

        torch.cuda.set_device(device)
