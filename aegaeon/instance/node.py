"""A node: the instances of one machine over its shared host model cache and host KV pool.

The node owns what its instances share: the host model cache and host KV pool (shared memory), the
latency profiles, and the two dispatchers of the token-level scheduler (grouped-FCFS prefill over
the prefill-capable instances, decode placement over the decode-capable ones). A request enters with
`submit`, is placed on a prefill queue, prefilled, placed in a decode batch (moving its KV through
the host pool when that batch is on another instance), decoded turn by turn, and its outputs reach
the submitter's callback as they come.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from aegaeon.config import (
    DEFAULT_ATTAINMENT_TARGET,
    DEFAULT_KEY_WEIGHT,
    DEFAULT_PRIORITY,
    SLO,
    NodeConfig,
    SchedulerConfig,
)
from aegaeon.engine.architecture import Architecture
from aegaeon.engine.handoff import RequestHandoff, SequenceHandoff
from aegaeon.engine.outputs import RequestDelta
from aegaeon.engine.prompt import PreparedPrompt, prepare_prompt
from aegaeon.engine.residency import weight_bytes
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.engine.tokenizer import Tokenizer
from aegaeon.engine.weights import parse_dtype, resolve_model_dir
from aegaeon.errors import InvalidRequest, ModelNotFound, RequestFailed, Unavailable
from aegaeon.instance.admission import Overloaded, Shed, retry_after_s
from aegaeon.instance.devices import CUDA, InstanceDevices, device_type, layout_instances, node_devices
from aegaeon.instance.instance import DECODING, Abort, Instance
from aegaeon.instance.remote import RemoteEngine, worker_address
from aegaeon.instance.request_level import RequestLevelInstance
from aegaeon.instance.snapshot import ModelTotals, NodeSnapshot, read_node
from aegaeon.instance.worker import ModelFacts, WorkerInfo, WorkerSpec
from aegaeon.memory.kv_pool import HostKVPool
from aegaeon.memory.model_cache import HostModelCache
from aegaeon.memory.shm import node_region_name, remove_orphans
from aegaeon.memory.sizing import available_host_bytes, host_sizes
from aegaeon.scheduler.decode import DecodeDispatcher, DecodeInstance
from aegaeon.scheduler.models import ModelSpec
from aegaeon.scheduler.predictor import Predictor, Profile, ProfileStore
from aegaeon.scheduler.prefill import PrefillDispatcher, PrefillQueue
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.slo import request_score
from aegaeon.scheduler.timeline import EventKind
from aegaeon.scheduler.turn_loop import COLOCATED, DECODE, PREFILL

logger = logging.getLogger(__name__)

# An instance process that dies more than MAX_RESTARTS times within RESTART_WINDOW_S is not restarted
# again: something it runs keeps killing it, and the node fails its requests instead of looping.
MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0

OutputCallback = Callable[[RequestDelta], None]
ErrorCallback = Callable[[BaseException], None]
# (request id, state, instance name): a request started prefilling on, or joined a decode batch of, an
# instance (PREFILLING, DECODING).
StateCallback = Callable[[str, str, str], None]


@dataclass
class LiveRequest:
    """A request in flight on the node: the scheduler's view, its inputs, and where outputs go."""

    sched: SchedRequest
    prompt_token_ids: list[int]
    params: SamplingParams
    on_output: OutputCallback
    on_error: ErrorCallback | None
    # The instance whose engine holds (or is about to receive) the request, and the tokens each of
    # its sequences generated so far (by index) with those that finished: what resumes it if that
    # instance's process dies.
    holder: str | None = None
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    # Its handoff (KV in the host pool) waits in the holder's inbox: it survives the holder's process.
    in_transit: bool = False


class Node:
    """The instances of one machine and the dispatchers that feed them."""

    def __init__(
        self, models: Mapping[str, str | Path], config: NodeConfig | None = None, progress: bool = True
    ):
        self.config = config or NodeConfig()
        if not models:
            raise ValueError("a node serves at least one model")
        self.lock = threading.Lock()
        self._work = threading.Condition(self.lock)
        self.stopping = False
        self.error: BaseException | None = None
        self.live: dict[str, LiveRequest] = {}
        # The newest ended requests (in the order they ended), how many ended in all, and per model the
        # running totals over every one of them.
        self.completed: deque[SchedRequest] = deque(maxlen=self.config.ended_history)
        self.ended_total = 0
        self.totals: dict[str, ModelTotals] = {}
        self.attainment_target = DEFAULT_ATTAINMENT_TARGET
        self._ids = itertools.count()
        self._t0 = time.monotonic()
        # Told where each request goes (the node server keeps the request records with it).
        self.on_state: StateCallback | None = None

        memory = self.config.memory
        dtype = parse_dtype(self.config.dtype)
        tag = f"{uuid.uuid4().hex[:8]}"
        # A node killed outright (SIGKILL, OOM) leaves its regions behind: clear them before adding ours.
        for path in remove_orphans(memory.shm_dir):
            logger.warning("removed %s, left by a node that is gone", path)
        sizes = host_sizes(memory, available_host_bytes(memory.shm_dir))
        largest = max(self._weight_bytes(models, dtype))
        if largest > sizes.model_cache_bytes:
            raise ValueError(
                f"the host model cache ({sizes.model_cache_bytes} bytes) cannot hold the largest model "
                f"({largest} bytes): raise host_model_cache_bytes (or host_memory_fraction)"
            )
        # Not pinned here: the node copies nothing to a GPU, its instance processes pin their own
        # mappings, and pinning would open a CUDA context (and take memory) on a GPU in the node.
        self.model_cache = HostModelCache.create(
            memory.shm_dir, sizes.model_cache_bytes, name=node_region_name("models", tag), pin=False
        )
        self.kv_pool = HostKVPool.create(
            memory.shm_dir, node_region_name("kv", tag), sizes.kv_pool_bytes, memory.kv_slab_bytes
        )
        self.engines: list[RemoteEngine] = []
        self.layout: list[InstanceDevices] = []  # each instance's devices, in the order of `engines`
        self._finalizer = weakref.finalize(self, _release, self.engines, self.model_cache, self.kv_pool)

        roles = (
            [COLOCATED] * self.config.colocated_instances
            if self.config.colocated
            else [PREFILL] * self.config.prefill_instances + [DECODE] * self.config.decode_instances
        )
        names = [f"{role}-{index}" for index, role in enumerate(roles)]
        try:
            infos = self._start_engines(
                tag, names, {name: str(path) for name, path in models.items()}, progress
            )
        except BaseException:
            self._finalizer()
            raise
        self.models: dict[str, ModelFacts] = infos[0].models
        # The node checks and tokenizes prompts itself, so a bad request never reaches an instance.
        self.tokenizers = {
            name: Tokenizer.from_pretrained(facts.model_dir) for name, facts in self.models.items()
        }
        self.specs = {name: model_spec(facts) for name, facts in self.models.items()}
        first = self.engines[0]  # idle until the instances start: it measures the shapes not profiled
        self.predictor = Predictor(
            {
                name: self._profile(spec, lambda name=name: first.profile(name, progress))
                for name, spec in self.specs.items()
            }
        )
        # Models being removed wait here, taking no new requests, until their last request ends.
        self._removing: dict[str, ModelFacts] = {}
        scheduler = self.config.scheduler
        self.instances: list[Instance] = []
        for name, role, engine, info in zip(names, roles, self.engines, infos, strict=True):
            queue = PrefillQueue(name, self.predictor, scheduler) if role != DECODE else None
            decode = (
                DecodeInstance(
                    name,
                    info.kv_bytes,
                    self.specs,
                    self.predictor,
                    scheduler,
                    self.config.engine.max_num_seqs,
                )
                if role != PREFILL
                else None
            )
            kind = RequestLevelInstance if self.config.policy == "request" else Instance
            self.instances.append(kind(name, role, engine, self, queue, decode))
        self.prefill = PrefillDispatcher(
            [i.prefill_queue for i in self.instances if i.prefill_queue is not None], scheduler
        )
        self.decode = DecodeDispatcher([i.decode for i in self.instances if i.decode is not None])
        self._by_name = {i.instance_name: i for i in self.instances}
        for instance in self.instances:
            instance.start()

    def _start_engines(
        self, tag: str, names: list[str], models: dict[str, str], progress: bool
    ) -> list[WorkerInfo]:
        """Spawn one instance process per name on its devices; wait until every engine is built."""
        config = self.config
        devices = node_devices(config.device, config.devices, config.tensor_parallel_size)
        self.layout = layout_instances(devices, names, config.tensor_parallel_size)
        used = {device for owned in self.layout for device in owned.devices}
        if len(used) < len(devices):
            logger.info("devices %s are left unused", ", ".join(d for d in devices if d not in used))
        shared = [owned for owned in self.layout if owned.sharers > 1]
        if shared and device_type(devices[0]) == CUDA:
            logger.warning(
                "%d instances need %d GPUs, the node has %d: instances share GPUs and split their memory",
                len(names),
                len(names) * config.tensor_parallel_size,
                len(devices),
            )
        for index, owned in enumerate(self.layout):
            spec = WorkerSpec(
                name=owned.name,
                models=models,
                device=owned.device,
                dtype=config.dtype,
                engine=config.engine,
                memory=replace(config.memory, device_sharers=owned.sharers),
                model_cache_name=self.model_cache.name,
                kv_pool_name=self.kv_pool.name,
                address=worker_address(tag, owned.name),
                cpu_threads=owned.cpu_threads,
                tensor_parallel_size=config.tensor_parallel_size,
                # One progress bar while the host cache fills: the other engines find it filled.
                progress=progress and index == 0,
                devices=owned.devices,
                env=owned.env,
            )
            self.engines.append(RemoteEngine.start(spec))
        return [engine.wait_ready() for engine in self.engines]

    def _weight_bytes(self, models: Mapping[str, str | Path], dtype: torch.dtype) -> list[int]:
        return [
            weight_bytes(Architecture.from_pretrained(resolve_model_dir(path)), dtype)
            for path in models.values()
        ]

    def _profile(self, spec: ModelSpec, measure: Callable[[], Profile]) -> Profile:
        """The latency profile of the model's shape on this device; `measure` it (and save it) if missing."""
        path = Path(self.config.profile_path).expanduser()
        store = ProfileStore.load(path)
        engine = self.engines[0]
        profile = store.get(spec.shape_key, engine.info.dtype, engine.info.device_name)
        if profile is None:
            profile = measure()
            store.add(profile)
            path.parent.mkdir(parents=True, exist_ok=True)
            store.save(path)
        errors = profile.describe_errors()
        level = logging.WARNING if profile.poor_fit else logging.INFO
        logger.log(level, "latency profile of %s (%s): %s", spec.name, spec.shape_key, errors)
        return profile

    def _measure_aside(self, name: str, path: str | Path) -> Profile:
        """Profile a model on an engine of its own in this process: serving engines are never idle.

        Only on the CPU: on an accelerator a second engine would take device memory the instances hold.
        """
        from aegaeon.engine.engine import LLMEngine
        from aegaeon.instance.profiler import profile_model

        config = self.config
        if torch.device(config.device).type != "cpu":
            raise InvalidRequest(
                f"no latency profile of model {name}'s shape on {config.device} ({config.dtype}) in "
                f"{config.profile_path}: measure it first with `aegaeon profile {name}={path} --device "
                f"{config.device} --dtype {config.dtype} --profiles {config.profile_path}`",
                param="path",
            )
        engine = LLMEngine(
            models={name: path},
            device=config.device,
            dtype=config.dtype,
            config=config.engine,
            memory=config.memory,
            model_cache=self.model_cache,
            progress=False,
        )
        try:
            return profile_model(engine, name, progress=False)
        finally:
            engine.unregister(name)

    # -- the live registry ---------------------------------------------------------------------------

    def add_model(
        self,
        name: str,
        path: str | Path,
        slo: SLO | None = None,
        pinned: bool = False,
        priority: float = DEFAULT_PRIORITY,
    ) -> ModelFacts:
        """Serve one more model: every engine registers it, then requests for it are taken.

        Each engine is held while it registers the model (its checkpoint's headers are checked; its
        weights are read into the host cache when first needed, or now if `pinned`, which keeps them
        there while this node serves it). `slo` (None: the default) and `priority` steer its scheduling.
        """
        with self.lock:
            if name in self.models or name in self._removing:
                raise InvalidRequest(f"a model called {name!r} is served already", param="name")
        registered: list[RemoteEngine] = []
        try:
            for engine in self.engines:
                facts = engine.register(name, str(path), pinned)
                registered.append(engine)
            spec = model_spec(facts)
            profile = self._profile(spec, lambda: self._measure_aside(name, path))
            tokenizer = Tokenizer.from_pretrained(facts.model_dir)
        except BaseException as error:
            for engine in registered:
                engine.unregister(name)
            if isinstance(error, (OSError, ValueError)) and not isinstance(error, InvalidRequest):
                # A path that is no model, a model too large for the arena: the caller's to fix.
                raise InvalidRequest(
                    f"cannot serve model {name!r} from {path}: {error}", param="path"
                ) from error
            raise
        with self._work:
            self.predictor.add(name, profile)
            self.specs[name] = spec
            for decode in self.decode.instances:
                decode.specs[name] = spec
            if slo is not None:
                slos = {**dict(self.config.scheduler.model_slos), name: slo}
                self._use_scheduler(replace(self.config.scheduler, model_slos=tuple(slos.items())))
            if priority != self.config.scheduler.priority(name):
                priorities = {**dict(self.config.scheduler.model_priorities), name: priority}
                self._use_scheduler(
                    replace(self.config.scheduler, model_priorities=tuple(priorities.items()))
                )
            self.tokenizers[name] = tokenizer
            self._spawn_with(name, str(path))
            self.models[name] = facts  # last: requests for it are taken from now on
        return facts

    def remove_model(self, name: str, timeout_s: float) -> None:
        """Take no new requests for `name`, let those in flight finish, then stop serving it.

        Unavailable if requests still run after `timeout_s`: the model stays out of service, and
        a later call waits for them again.
        """
        with self._work:
            facts = self.models.pop(name, None) or self._removing.get(name)
            if facts is None:
                raise ModelNotFound(f"model {name!r} is not served here")
            self._removing[name] = facts
            deadline = time.monotonic() + timeout_s
            while (running := sum(1 for live in self.live.values() if live.sched.model == name)) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(
                        f"model {name!r} takes no new requests but {running} still run after "
                        f"{timeout_s:g} s; remove it again once they finished"
                    )
                self._work.wait(min(left, self.config.idle_wait_s))
        for engine in self.engines:
            engine.unregister(name)
        with self._work:
            del self._removing[name]
            self.specs.pop(name, None)
            for decode in self.decode.instances:
                decode.specs.pop(name, None)
            self.tokenizers.pop(name, None)
            self._spawn_with(name, None)

    def _spawn_with(self, name: str, path: str | None) -> None:
        """A restarted instance process registers the models served now: add (or drop) one in its spec."""
        for engine in self.engines:
            models = {**engine.spec.models, name: path}
            engine.spec = replace(engine.spec, models={k: v for k, v in models.items() if v is not None})

    def _use_scheduler(self, scheduler: SchedulerConfig) -> None:
        """Schedule with `scheduler` from now on (under the lock)."""
        self.config = replace(self.config, scheduler=scheduler)
        self.prefill.config = scheduler
        for queue in self.prefill.instances:
            queue.config = scheduler
        for decode in self.decode.instances:
            decode.config = scheduler

    # -- requests ------------------------------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the node started: the clock of the scheduler and the timelines."""
        return time.monotonic() - self._t0

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        model: str | None,
        on_output: OutputCallback,
        on_error: ErrorCallback | None = None,
        request_id: str | None = None,
        output_token_ids: Mapping[int, list[int]] | None = None,
        finish_reasons: Mapping[int, str] | None = None,
        key: str | None = None,
        key_weight: float = DEFAULT_KEY_WEIGHT,
    ) -> str:
        """Accept a request (ValueError/KeyError on bad input, before anything is queued); its id.

        A request begun elsewhere (its node went silent) brings its tokens so far by choice index, and
        the choices that finished: it continues as after an instance restart, its KV recomputed.
        `key` (the id of the API key it came with) and `key_weight` place it in its model's fair queue.
        """
        if self.error is not None:
            raise Unavailable(f"the node has failed: {self.error}")
        prepared = self.prepare_prompt(prompt, params, model)
        request_id = request_id or f"req-{next(self._ids)}"
        sched = SchedRequest(
            request_id,
            prepared.model,
            self.now(),
            len(prepared.token_ids),
            prepared.max_tokens,
            key=key,
            key_weight=key_weight,
        )
        live = LiveRequest(sched, prepared.token_ids, params, on_output, on_error)
        live.token_ids = {index: list(ids) for index, ids in (output_token_ids or {}).items() if ids}
        live.finish_reasons = dict(finish_reasons or {})
        resumed = max(map(len, live.token_ids.values()), default=0)
        if resumed >= sched.max_tokens:
            raise InvalidRequest(f"request {request_id!r} has all its {sched.max_tokens} tokens already")
        for _ in range(resumed):
            sched.record_token(sched.arrival_s)
        with self._work:
            if request_id in self.live:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._admit(prepared.model, key, key_weight)
            self.live[request_id] = live
            if live.token_ids:
                try:
                    self._resume(live)
                except BaseException:
                    del self.live[request_id]
                    raise
            else:
                self.prefill.submit(sched)
                self.prefill.dispatch(self.now())
            self._work.notify_all()
        return request_id

    def _admit(self, model: str, key: str | None = None, key_weight: float = DEFAULT_KEY_WEIGHT) -> None:
        """Refuse a request of `model` if too many of its requests wait already (under the lock).

        At the limit, a request whose API key holds less than its weighted share of the limit among
        the keys waiting is still taken: one key's flood fills the queue for itself only. (The shares
        add up to the limit, so the queue stays bounded by about twice it.)
        """
        limit = self.config.max_waiting_per_model
        waiting = [
            live.sched
            for live in self.live.values()
            if live.sched.model == model and not live.sched.token_times
        ]
        if len(waiting) < limit:
            return
        weights = {r.key: r.key_weight for r in waiting} | {key: key_weight}
        mine = sum(1 for r in waiting if r.key == key)
        if mine < limit * key_weight / sum(weights.values()):
            return
        drain_s = min(queue.waiting_work_s(self.now()) for queue in self.prefill.instances)
        raise Overloaded(
            f"model {model!r} has {len(waiting)} waiting to start (the limit is {limit}); retry later",
            retry_after_s(drain_s),
        )

    def shed_if_late(self, request: SchedRequest) -> bool:
        """Fail a request that waited longer than `shed_waiting_after_s` for its prefill; True if so."""
        limit = self.config.shed_waiting_after_s
        waited = self.now() - request.arrival_s
        if limit is None or waited <= limit:
            return False
        message = (
            f"request waited {waited:.1f} s for its prefill (the node sheds after {limit:g} s): overloaded"
        )
        self._fail(request.request_id, Shed(message))
        return True

    def prepare_prompt(
        self, prompt: str | list[int], params: SamplingParams, model: str | None
    ) -> PreparedPrompt:
        """Tokenize and check a prompt for `model` (ValueError / KeyError saying what is wrong)."""
        if model is None:
            if len(self.models) > 1:
                raise InvalidRequest(
                    f"several models are served ({', '.join(self.models)}): name one", param="model"
                )
            model = next(iter(self.models))
        facts = self.models.get(model)
        if facts is None:
            raise ModelNotFound(f"model {model!r} is not served here; served: {', '.join(self.models)}")
        return prepare_prompt(
            model, self.tokenizers[model], facts.vocab_size, facts.max_model_len, prompt, params
        )

    def deliver(self, output: RequestDelta, now: float) -> None:
        """An engine step advanced a request: account for its token and pass what is new on."""
        live = self.live.get(output.request_id)
        if live is None:
            return
        with self.lock:
            # The scheduler's request finishes only when the engine says so: with n > 1, a sibling
            # sequence (preempted, recomputed) may still be running when the count is reached.
            if not live.sched.done and (output.finished or live.sched.generated + 1 < live.sched.max_tokens):
                live.sched.record_token(now)
            if output.finished and not live.sched.done:
                live.sched.finish(now)
            for seq in output.outputs:
                live.token_ids.setdefault(seq.index, []).extend(seq.token_ids)
                if seq.finish_reason is not None:
                    live.finish_reasons[seq.index] = seq.finish_reason
            if output.finished:
                del self.live[output.request_id]
                self.request_ended(live.sched)
        live.on_output(output)

    def request_moved(self, request_id: str, state: str, instance: str) -> None:
        """A request started prefilling on, or joined a decode batch of, `instance`."""
        if self.on_state is not None:
            self.on_state(request_id, state, instance)

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is (queued, prefilling, decoding); False if it is not in flight.

        Its callbacks get nothing more; its KV blocks are freed by the instance that holds them.
        """
        with self._work:
            live = self.live.pop(request_id, None)
            if live is None:
                return False
            for queue in self.prefill.instances:
                queue.remove(live.sched)
            for decode in self.decode.instances:
                decode.remove(live.sched)
            live.sched.fail(self.now())
            self._work.notify_all()
        for instance in self.instances:
            instance.inbox.put(Abort(request_id))
        return True

    def after_prefill(self, request: SchedRequest, instance: Instance) -> None:
        """Place a prefilled request in a decode batch; move its KV if the batch is elsewhere.

        The handoff's future reaches the target's inbox under the same lock as the placement, so a
        round the target plans with this request finds it there; the export itself (waiting for the
        KV's host copy) runs outside the lock, so the other instances keep stepping meanwhile, and
        the target waits for it only when it adopts the request.
        """
        moving: Future[RequestHandoff | None] | None = None
        with self._work:
            aborted = request.request_id not in self.live
            placement = None if aborted else self.decode.dispatch(request)
            if placement is not None:
                target = self._by_name[self.decode.instances[placement.instance].name]
                if target is not instance:
                    moving = Future()
                    target.inbox.put(moving)
                    live = self.live[request.request_id]
                    live.holder, live.in_transit = target.instance_name, True
                    self._work.notify_all()
        if moving is not None:
            self._export(request.request_id, instance, moving)
        if placement is not None:
            self.request_moved(request.request_id, DECODING, target.instance_name)
        if aborted:
            instance.engine.abort_request(request.request_id)
        elif placement is None:
            instance.engine.abort_request(request.request_id)
            message = f"request {request.request_id} does not fit the KV memory of any decode instance"
            self._fail(request.request_id, RequestFailed(message))

    def _export(self, request_id: str, instance: Instance, moving: Future[RequestHandoff | None]) -> None:
        """Hand a request over from `instance`'s engine into `moving` (outside the node's lock).

        If the export fails (the instance died), the request goes without KV: its output so far is
        recomputed where it arrives, as for any request whose KV was lost (None: it was aborted).
        """
        try:
            moving.set_result(instance.engine.export_request(request_id))
        finally:
            if not moving.done():
                with self.lock:
                    live = self.live.get(request_id)
                moving.set_result(resume_handoff(live) if live is not None else None)

    def _fail(self, request_id: str, error: BaseException) -> None:
        with self.lock:
            live = self.live.pop(request_id, None)
            if live is None:
                return
            live.sched.fail(self.now())
            self.request_ended(live.sched)
        if live.on_error is not None:
            live.on_error(error)

    def restart_instance(self, instance: Instance, death: BaseException) -> bool:
        """An instance process died: start a new one and resume the requests it held.

        A request that had output tokens is handed, without KV, to the decode instance whose batch
        holds it (placed anew if none does): the engine recomputes its KV from the prompt and the
        tokens so far, and greedy decoding goes on exactly as it would have. One still waiting for
        its first token is queued for prefill again. False (and every request failed) if the
        instance cannot be restarted, or died too often.
        """
        now = time.monotonic()
        instance.restarts = [t for t in instance.restarts if now - t < RESTART_WINDOW_S] + [now]
        if not instance.recoverable or len(instance.restarts) > MAX_RESTARTS or self.stopping:
            self.instance_failed(instance, death)
            return False
        logger.warning("%s; restarting it", death)
        index = self.engines.index(instance.engine)
        instance.engine.close()
        try:
            engine = RemoteEngine.start(instance.engine.spec)
            engine.wait_ready()
        except BaseException as error:  # noqa: BLE001 - reported to every request of the node
            self.instance_failed(instance, error)
            return False
        self.engines[index] = instance.engine = engine
        instance.timeline.record(EventKind.RESTART, None, self.now(), self.now(), detail=str(death))
        with self._work:
            if instance.prefilling is not None and instance.prefill_queue is not None:
                instance.prefill_queue.complete()
            instance.prefilling = None
            lost = [
                live
                for live in self.live.values()
                if live.holder == instance.instance_name and not live.in_transit
            ]
            for live in lost:
                self._resume(live)
            self._work.notify_all()
        return True

    def _resume(self, live: LiveRequest) -> None:
        """Send a request whose KV was lost where it continues (under the node's lock)."""
        request = live.sched
        if not live.token_ids:  # no token yet: prefill it again, first in line
            live.holder = None
            for queue in self.prefill.instances:
                queue.remove(request)
            self.prefill.submit(request)
            self.prefill.dispatch(self.now())
            return
        holder = next((d for d in self.decode.instances if request in d.requests()), None)
        if holder is None:
            placement = self.decode.dispatch(request)
            if placement is None:
                raise RequestFailed(f"request {request.request_id} fits no decode instance after a restart")
            holder = self.decode.instances[placement.instance]
        target = self._by_name[holder.name]
        live.holder, live.in_transit = target.instance_name, True
        target.inbox.put(resume_handoff(live))

    def instance_failed(self, instance: Instance, error: BaseException) -> None:
        """An instance loop died: fail every request in flight rather than let them hang."""
        self.error = error
        for request_id in list(self.live):
            self._fail(request_id, error)

    def wait_for_work(self) -> None:
        with self._work:
            if not self.stopping:
                self._work.wait(self.config.idle_wait_s)

    # -- reading the node ------------------------------------------------------------------------------

    def request_ended(self, request: SchedRequest) -> None:
        """Keep an ended (finished or failed) request and count it (under the lock)."""
        self.completed.append(request)
        self.ended_total += 1
        score = request_score(request, self.config.scheduler.slo(request.model))
        self.totals.setdefault(request.model, ModelTotals()).add(request, score, self.attainment_target)

    def ended_since(self, cursor: int) -> tuple[list[SchedRequest], int]:
        """The held requests that ended after the first `cursor` ones, and the cursor for next time."""
        with self.lock:
            first = self.ended_total - len(self.completed)  # the sequence number of completed[0]
            skip = max(cursor - first, 0)
            return list(itertools.islice(self.completed, skip, None)), self.ended_total

    def snapshot(self) -> NodeSnapshot:
        """The node's state now, read under its lock (the shared pools' figures under their own)."""
        model_cache, kv_pool = self.model_cache.stats(), self.kv_pool.stats()
        with self.lock:
            return read_node(self, model_cache, kv_pool)

    # -- lifecycle -----------------------------------------------------------------------------------

    def timelines(self):
        return {instance.instance_name: instance.timeline for instance in self.instances}

    def close(self) -> None:
        """Stop the instances and release the shared memory."""
        with self._work:
            self.stopping = True
            self._work.notify_all()
        for instance in self.instances:
            instance.join()
        self._finalizer()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def model_spec(facts: ModelFacts) -> ModelSpec:
    """What the scheduler knows of a model."""
    return ModelSpec(
        name=facts.name,
        shape_key=facts.shape_key,
        weight_bytes=facts.weight_bytes,
        kv_block_bytes=facts.kv_block_bytes,
        max_model_len=facts.max_model_len,
    )


def resume_handoff(live: LiveRequest) -> RequestHandoff:
    """A request handed over without KV: its output so far, to be recomputed and continued."""
    return RequestHandoff(
        request_id=live.sched.request_id,
        model=live.sched.model,
        prompt_token_ids=list(live.prompt_token_ids),
        params=live.params,
        max_tokens=live.sched.max_tokens,
        seqs=[
            SequenceHandoff(
                index=index,
                output_token_ids=list(live.token_ids.get(index, [])),
                host_blocks=[],
                # Lost with the process: a seeded sampled request continues with a fresh stream.
                generator_state=None,
                finish_reason=live.finish_reasons.get(index),
            )
            for index in range(live.params.n)
        ],
    )


def _release(engines: list[RemoteEngine], model_cache: HostModelCache, kv_pool: HostKVPool) -> None:
    """Stop the instance processes, then release the shared memory they used."""
    for engine in engines:
        engine.close()
    model_cache.close()
    kv_pool.close()
