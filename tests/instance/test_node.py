"""Many models on the instances of one node, scheduled token by token, exact against transformers.

A user sees: every request of every model gets exactly transformers' greedy tokens, whether one
colocated instance does everything or a prefill instance hands KV to a decode instance through the
host pool; and the instance's timeline shows models switched out mid-request and resumed.
"""

from __future__ import annotations

import random
import threading

import pytest

from aegaeon.config import MIB, SLO, EngineConfig, MemoryConfig, NodeConfig, SchedulerConfig
from aegaeon.engine.outputs import RequestOutput
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.instance.node import Node
from aegaeon.scheduler.timeline import EventKind

OUTPUT_TOKENS = 32
REQUESTS_PER_MODEL = 2
KV_BYTES = 4 * MIB
# Room for the weights of one or two of the five models: switches copy weights, as they do when a
# device serves more models than it holds (with every model resident, a switch is free and the
# round gives each batch long turns instead).
WEIGHT_BYTES = 3 * MIB


# A TBT target far above any step time of these tiny models, even on a loaded machine: the rounds
# then always have room to interleave models token by token (S stays well below the alpha floor).
# Under a TBT the device cannot meet (S >= 1), the round rightly gives each batch long turns instead.
RELAXED_SLO = SLO(ttft_s=60.0, tbt_s=5.0)


def node_config(profile_path, **kwargs) -> NodeConfig:
    return NodeConfig(
        profile_path=str(profile_path),
        scheduler=SchedulerConfig(default_slo=RELAXED_SLO),
        engine=EngineConfig(kv_cache_bytes=KV_BYTES),
        memory=MemoryConfig(
            cpu_arena_bytes=KV_BYTES + WEIGHT_BYTES, host_kv_pool_bytes=64 * MIB, kv_slab_bytes=4 * MIB
        ),
        **kwargs,
    )


@pytest.fixture(scope="module")
def workload(five_model_dirs):
    """Interleaved requests: (request id, model, prompt), models taking turns."""
    rng = random.Random(3)
    names = list(five_model_dirs)
    return [
        (f"{name}-{i}", name, [rng.randrange(3, 900) for _ in range(rng.randint(2, 30))])
        for i in range(REQUESTS_PER_MODEL)
        for name in names
    ]


def run(node: Node, workload) -> dict[str, list[int]]:
    """Submit the whole workload at once; the output tokens of each request."""
    generated: dict[str, list[int]] = {}
    finished: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    done = threading.Event()

    def on_output(output):
        generated.setdefault(output.request_id, []).extend(output.outputs[0].token_ids)
        if output.finished:
            finished[output.request_id] = generated[output.request_id]
            if len(finished) == len(workload):
                done.set()

    def on_error(error):
        errors.append(error)
        done.set()

    params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    for request_id, model, prompt in workload:
        node.submit(prompt, params, model, on_output, on_error, request_id=request_id)
    assert done.wait(120), f"only {len(finished)} of {len(workload)} requests finished"
    assert not errors, errors
    return finished


def assert_exact(finished, workload, five_model_dirs, hf_greedy) -> None:
    for request_id, model, prompt in workload:
        assert finished[request_id] == hf_greedy(five_model_dirs[model], prompt, OUTPUT_TOKENS), request_id


def test_five_models_share_one_colocated_instance_token_by_token(
    five_model_dirs, workload, hf_greedy, profile_path
):
    with Node(five_model_dirs, node_config(profile_path), progress=False) as node:
        finished = run(node, workload)
        timeline = node.instances[0].timeline
    assert_exact(finished, workload, five_model_dirs, hf_greedy)
    # Token-level interleaving: each model was switched out while its requests were unfinished,
    # another model ran, and the model came back to finish them.
    interleaved = [name for name in five_model_dirs if timeline.interleaved(name)]
    turns = timeline.of_kind(EventKind.DECODE_TURN)
    assert len(interleaved) >= 3, [turn.model for turn in turns]
    assert len({turn.model for turn in turns}) == len(five_model_dirs)
    # Turns are long enough that switches stay a small share of a round, yet every model comes back.
    assert len(turns) >= 2 * len(five_model_dirs)


def test_prefill_and_decode_instances_hand_kv_through_the_host_pool(
    five_model_dirs, workload, hf_greedy, profile_path
):
    config = node_config(profile_path, colocated=False, prefill_instances=1, decode_instances=1)
    with Node(five_model_dirs, config, progress=False) as node:
        finished = run(node, workload)
        prefill, decode = node.instances
        assert node.kv_pool.stats().allocated_bytes == 0  # every handed-over block came back
    assert_exact(finished, workload, five_model_dirs, hf_greedy)
    assert prefill.timeline.of_kind(EventKind.PREFILL) and not prefill.timeline.of_kind(EventKind.DECODE_TURN)
    assert decode.timeline.of_kind(EventKind.DECODE_TURN) and not decode.timeline.of_kind(EventKind.PREFILL)


def test_the_scheduler_reports_slo_for_every_request(five_model_dirs, workload, profile_path):
    from aegaeon.scheduler.slo import slo_report

    with Node(five_model_dirs, node_config(profile_path), progress=False) as node:
        run(node, workload)
        report = slo_report(node.completed, node.config.scheduler)
    assert report.num_finished == len(workload) and report.num_failed == 0
    assert report.mean_ttft_s is not None and report.mean_ttft_s > 0


def test_bad_requests_are_refused_before_anything_is_queued(five_model_dirs, profile_path):
    with Node({"llama": five_model_dirs["llama"]}, node_config(profile_path), progress=False) as node:
        with pytest.raises(KeyError, match="not served"):
            node.submit([1, 2], SamplingParams(), "nope", lambda output: None)
        with pytest.raises(ValueError, match="max_model_len"):
            node.submit([1] * 10_000, SamplingParams(), "llama", lambda output: None)
        assert not node.live


def test_an_aborted_request_stops_and_frees_its_kv_while_others_finish(
    five_model_dirs, profile_path, hf_greedy
):
    config = node_config(profile_path, colocated=False, prefill_instances=1, decode_instances=1)
    models = {name: five_model_dirs[name] for name in ("llama", "qwen3")}
    with Node(models, config, progress=False) as node:
        outputs: dict[str, list] = {"long": [], "short": []}
        totals = {name: RequestOutput(name, None, []) for name in outputs}
        done = threading.Event()

        def collect(name):
            def on_output(output):
                outputs[name].append(output)
                totals[name].add(output)
                if output.finished:
                    done.set()

            return on_output

        long_params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        node.submit([5, 6, 7], long_params, "llama", collect("long"), request_id="long")
        while len(outputs["long"]) < 3:
            threading.Event().wait(0.01)
        assert node.abort("long")
        assert not node.abort("long")  # already gone
        node.submit(
            [9, 8, 7],
            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
            "qwen3",
            collect("short"),
            request_id="short",
        )
        assert done.wait(60)
        assert totals["short"].token_ids == hf_greedy(five_model_dirs["qwen3"], [9, 8, 7], 8)
        assert len(outputs["long"]) < 400 and not outputs["long"][-1].finished
        deadline = node.now() + 10
        while node.kv_pool.stats().allocated_bytes and node.now() < deadline:
            threading.Event().wait(0.01)
        assert node.kv_pool.stats().allocated_bytes == 0
        for instance in node.instances:
            assert not instance.engine.has_unfinished_requests()


def test_n_samples_finish_even_when_one_is_preempted(five_model_dirs, profile_path):
    """Twenty long samples overflow the KV blocks: preempted ones are recomputed and all finish."""
    with Node({"llama": five_model_dirs["llama"]}, node_config(profile_path), progress=False) as node:
        done = threading.Event()
        result = [RequestOutput("n", None, [])]

        def on_output(output):
            result[0].add(output)
            if output.finished:
                done.set()

        params = SamplingParams(n=20, max_tokens=400, ignore_eos=True, seed=1)
        node.submit("hi", params, "llama", on_output)
        assert done.wait(300), "the request never finished"
        assert [len(o.token_ids) for o in result[0].outputs] == [400] * 20
