"""The device layout of a node: each instance on its own devices, and its process told which.

A user sees: on an 8-GPU machine, 3 prefill + 5 decode instances each get one GPU, and two TP=4
instances four GPUs each, never the same one twice; every instance process is started seeing only
its own devices; a device list that cannot work is refused with a message that says why. And a real
node with two CPU devices runs its prefill and decode instance processes each on its own one.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import yaml

from aegaeon.cli import build_parser, serve_config_from_args
from aegaeon.config import MIB, SLO, EngineConfig, MemoryConfig, NodeConfig, SchedulerConfig
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.instance.devices import (
    CPU_CORES_ENV,
    DEVICES_ENV,
    VISIBLE_DEVICES_ENV,
    format_cores,
    layout_instances,
    node_devices,
    parse_cores,
    parse_devices,
)
from aegaeon.instance.node import Node
from aegaeon.scheduler.timeline import EventKind

EIGHT_GPUS = tuple(f"cuda:{index}" for index in range(8))
NO_VISIBLE_LIST: dict[str, str] = {}  # a node started without CUDA_VISIBLE_DEVICES of its own
REQUEST_TIMEOUT_S = 120


def names(prefill: int, decode: int) -> list[str]:
    """Instance names as a node gives them: prefill ones first, numbered across both roles."""
    roles = ["prefill"] * prefill + ["decode"] * decode
    return [f"{role}-{index}" for index, role in enumerate(roles)]


def test_three_prefill_and_five_decode_instances_each_get_their_own_gpu():
    layout = layout_instances(EIGHT_GPUS, names(3, 5), environ=NO_VISIBLE_LIST)
    assert [owned.devices for owned in layout] == [(device,) for device in EIGHT_GPUS]
    for index, owned in enumerate(layout):
        # The process sees exactly its GPU, as its own cuda:0, and shares it with nobody.
        assert owned.env[VISIBLE_DEVICES_ENV] == str(index)
        assert owned.env[DEVICES_ENV] == f"cuda:{index}"
        assert owned.device == "cuda:0" and owned.sharers == 1 and owned.cpu_threads is None
    assert len({owned.env[VISIBLE_DEVICES_ENV] for owned in layout}) == 8


def test_two_tensor_parallel_instances_get_four_distinct_gpus_each():
    layout = layout_instances(EIGHT_GPUS, names(1, 1), tensor_parallel_size=4, environ=NO_VISIBLE_LIST)
    prefill, decode = layout
    assert prefill.devices == EIGHT_GPUS[:4] and decode.devices == EIGHT_GPUS[4:]
    assert prefill.env[VISIBLE_DEVICES_ENV] == "0,1,2,3"
    assert decode.env[VISIBLE_DEVICES_ENV] == "4,5,6,7"
    # Rank r of each instance uses its local cuda:r, inside its own visible set.
    assert prefill.local_devices == decode.local_devices == ("cuda:0", "cuda:1", "cuda:2", "cuda:3")
    assert not set(prefill.devices) & set(decode.devices)


def test_a_node_shown_some_gpus_passes_on_the_names_it_was_given():
    environ = {VISIBLE_DEVICES_ENV: "GPU-aa,GPU-bb,6,7"}
    layout = layout_instances(("cuda:1", "cuda:3"), names(1, 1), environ=environ)
    assert [owned.env[VISIBLE_DEVICES_ENV] for owned in layout] == ["GPU-bb", "7"]


def test_more_instances_than_gpus_share_them_evenly_and_split_their_memory():
    layout = layout_instances(EIGHT_GPUS[:2], names(1, 3), environ=NO_VISIBLE_LIST)
    assert [owned.devices for owned in layout] == [("cuda:0",), ("cuda:1",), ("cuda:0",), ("cuda:1",)]
    assert all(owned.sharers == 2 for owned in layout)
    # A TP instance on shared GPUs still gets distinct ones.
    layout = layout_instances(EIGHT_GPUS[:3], names(1, 1), tensor_parallel_size=2, environ=NO_VISIBLE_LIST)
    assert [owned.devices for owned in layout] == [("cuda:0", "cuda:1"), ("cuda:2", "cuda:0")]
    assert [owned.sharers for owned in layout] == [2, 2]


def test_cpu_devices_split_the_cores_and_instances_sharing_one_split_its_threads():
    cores = range(8)
    two = layout_instances(("cpu:0", "cpu:1"), names(1, 1), cpu_cores=cores)
    assert [owned.env[CPU_CORES_ENV] for owned in two] == ["0-3", "4-7"]
    assert [owned.cpu_threads for owned in two] == [4, 4] and two[0].device == "cpu"
    # The default: one CPU device, its cores shared by every instance as threads.
    shared = layout_instances(("cpu:0",), names(1, 1), cpu_cores=cores)
    assert [owned.env[CPU_CORES_ENV] for owned in shared] == ["0-7", "0-7"]
    assert [owned.cpu_threads for owned in shared] == [4, 4]
    # More CPU devices than cores: each still gets one.
    few = layout_instances(("cpu:0", "cpu:1", "cpu:2"), names(1, 2), cpu_cores=[5, 9])
    assert [owned.env[CPU_CORES_ENV] for owned in few] == ["5", "9", "5"]


def test_an_instance_needing_more_devices_than_the_node_has_is_refused():
    with pytest.raises(ValueError, match="tensor_parallel_size 4 needs 4 distinct devices.*has 2"):
        layout_instances(EIGHT_GPUS[:2], names(1, 1), tensor_parallel_size=4)
    with pytest.raises(ValueError, match="cuda:7 are not visible: this node sees 1 GPU"):
        node_devices("cuda", ("cuda:0", "cuda:7"), gpu_count=1)
    with pytest.raises(ValueError, match="no GPU is visible"):
        node_devices("cuda", None, gpu_count=0)


def test_a_node_owns_every_visible_gpu_or_one_cpu_device_by_default():
    assert node_devices("cuda", None, gpu_count=8) == EIGHT_GPUS
    assert node_devices("cuda:1", None, gpu_count=2) == ("cuda:1",)
    assert node_devices("cpu", None) == ("cpu:0",)
    assert node_devices("cpu", None, tensor_parallel_size=2) == ("cpu:0", "cpu:1")


@pytest.mark.parametrize(
    ("spec", "kind", "devices"),
    [
        ("0-7", "cuda", EIGHT_GPUS),
        ("0,2, 4", "cuda", ("cuda:0", "cuda:2", "cuda:4")),
        (3, "cuda", ("cuda:3",)),
        ([0, "cuda:5"], "cuda", ("cuda:0", "cuda:5")),
        ("cpu,cpu", "cpu", ("cpu:0", "cpu:1")),
        ("cpu:1,cpu:0", "cpu", ("cpu:1", "cpu:0")),
    ],
)
def test_device_lists_are_read_as_written(spec, kind, devices):
    assert parse_devices(spec, kind) == devices


@pytest.mark.parametrize(
    ("spec", "kind", "message"),
    [
        ("0-7", "cpu", "not all cpu devices.*set device to cuda"),
        ("cpu,cpu", "cuda", "not all cuda devices"),
        ("0,1,1", "cuda", "cuda:1 more than once"),
        ("3-1", "cuda", "runs backwards"),
        ("gpu0", "cuda", "cannot read device 'gpu0'"),
        ("", "cuda", "cannot read device"),
        ("cuda", "cuda", "name GPUs by ordinal"),
    ],
)
def test_a_device_list_that_cannot_work_is_refused_saying_why(spec, kind, message):
    with pytest.raises(ValueError, match=message):
        parse_devices(spec, kind)


def test_core_lists_read_and_write_like_the_kernel_does():
    assert format_cores([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert parse_cores("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]


def test_devices_come_from_the_flag_or_the_yaml_file(tmp_path):
    parser = build_parser()
    config = serve_config_from_args(
        parser.parse_args(["serve", "a=/m", "--device", "cuda", "--devices", "0-3"])
    )
    assert config.node.devices == EIGHT_GPUS[:4]
    config_file = tmp_path / "node.yaml"
    config_file.write_text(yaml.safe_dump({"models": ["a=/m"], "device": "cuda", "devices": [4, 5]}))
    config = serve_config_from_args(parser.parse_args(["serve", "--config", str(config_file)]))
    assert config.node.devices == ("cuda:4", "cuda:5")
    with pytest.raises(SystemExit, match="not all cpu devices"):
        serve_config_from_args(parser.parse_args(["serve", "a=/m", "--devices", "0-3"]))


def test_the_node_config_refuses_layouts_that_cannot_work():
    with pytest.raises(ValueError, match="tensor_parallel_size 4 needs that many.*lists 2"):
        NodeConfig(device="cuda", devices="0,1", tensor_parallel_size=4)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        NodeConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="names one GPU"):
        NodeConfig(device="cuda:1", devices="0-1")


def environ_of(pid: int) -> dict[str, str]:
    """The environment a process was started with, as the kernel keeps it."""
    with open(f"/proc/{pid}/environ", "rb") as environ:
        entries = environ.read().decode().split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def allowed_cores(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("Cpus_allowed_list:"))
    return parse_cores(line.split(":", 1)[1])


def generate(node: Node, prompt: list[int], tokens: int) -> list[int]:
    """One greedy request through the node; its output tokens."""
    output: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def on_output(delta):
        output.extend(delta.outputs[0].token_ids)
        if delta.finished:
            done.set()

    def on_error(error):
        errors.append(error)
        done.set()

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    node.submit(prompt, params, "llama", on_output, on_error)
    assert done.wait(REQUEST_TIMEOUT_S) and not errors, errors
    return output


def test_a_node_with_two_cpu_devices_runs_its_prefill_and_decode_instance_each_on_its_own(
    make_demo_model, hf_greedy, profile_path
):
    model = make_demo_model("llama")
    config = NodeConfig(
        devices="cpu,cpu",
        colocated=False,
        profile_path=str(profile_path),
        scheduler=SchedulerConfig(default_slo=SLO(ttft_s=60.0, tbt_s=5.0)),
        engine=EngineConfig(kv_cache_bytes=4 * MIB),
        memory=MemoryConfig(cpu_arena_bytes=8 * MIB, host_kv_pool_bytes=64 * MIB, kv_slab_bytes=4 * MIB),
    )
    prompt, tokens = [5, 9, 200, 31], 8
    with Node({"llama": model}, config, progress=False) as node:
        pids = [engine.info.pid for engine in node.engines]
        environs = [environ_of(pid) for pid in pids]
        cores = [allowed_cores(pid) for pid in pids]
        devices = [instance.device for instance in node.snapshot().instances]
        first = generate(node, prompt, tokens)
        # A restarted instance process comes back on the same device.
        os.kill(pids[1], signal.SIGKILL)
        second = generate(node, prompt, tokens)
        restarted = node.engines[1].info.pid
        restarted_environ, restarted_cores = environ_of(restarted), allowed_cores(restarted)
        prefill, decode = node.instances
    assert [environ[DEVICES_ENV] for environ in environs] == ["cpu:0", "cpu:1"] == devices
    # Each process runs on the cores its environment names, and the two CPU devices do not overlap
    # (on a one-core machine both get that core).
    assert [parse_cores(environ[CPU_CORES_ENV]) for environ in environs] == cores
    if len(set(cores[0]) | set(cores[1])) > 1:
        assert not set(cores[0]) & set(cores[1]), cores
    # Requests were prefilled on one device and decoded on the other, exactly.
    assert prefill.timeline.of_kind(EventKind.PREFILL) and not prefill.timeline.of_kind(EventKind.DECODE_TURN)
    assert decode.timeline.of_kind(EventKind.DECODE_TURN) and not decode.timeline.of_kind(EventKind.PREFILL)
    assert first == second == hf_greedy(model, prompt, tokens)
    assert restarted != pids[1] and decode.timeline.of_kind(EventKind.RESTART)
    assert restarted_environ[DEVICES_ENV] == "cpu:1" and restarted_cores == cores[1]
