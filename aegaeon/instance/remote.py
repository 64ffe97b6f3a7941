"""The node's handle on an instance process: start it, call its engine, notice when it dies.

`RemoteEngine.start` spawns the worker (aegaeon/instance/worker.py) and waits for its engine; each
method is then one ZeroMQ round trip to it. A call waits in short slices and checks the process in
between, so a worker that died turns into `InstanceDied` instead of a hang. One thread uses a
RemoteEngine at a time in practice (its instance loop); a lock keeps the socket safe regardless.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import zmq

from aegaeon.engine.handoff import RequestHandoff
from aegaeon.engine.outputs import RequestDelta
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.errors import RequestFailed
from aegaeon.instance.worker import Call, ModelFacts, Reply, SwitchResult, WorkerInfo, WorkerSpec
from aegaeon.scheduler.predictor import Profile

# A call checks whether its worker is still alive this often while it waits for the answer.
LIVENESS_POLL_MS = 200
# How long a worker asked to shut down gets before it is killed.
SHUTDOWN_GRACE_S = 10.0


class InstanceDied(RequestFailed):
    """The instance process exited (crashed, killed) while the node still needed it."""


def worker_address(tag: str, name: str) -> str:
    """A private IPC endpoint for one worker of one node."""
    return f"ipc://{Path(tempfile.gettempdir()) / f'aegaeon-{tag}-{name}.sock'}"


class RemoteEngine:
    """An instance process's engine, called from its node."""

    def __init__(self, spec: WorkerSpec, process: subprocess.Popen):
        self.spec = spec
        self.process = process
        self._context = zmq.Context.instance()
        self._socket = self._connect()
        self._lock = threading.Lock()  # a ZeroMQ socket must not be used by two threads at once
        self.info: WorkerInfo | None = None

    @classmethod
    def start(cls, spec: WorkerSpec) -> RemoteEngine:
        """Start the worker process; `wait_ready` then waits for its engine to be built.

        A fresh interpreter (not a fork, so no CUDA context or lock state is inherited, and not
        multiprocessing's spawn, which would re-run the user's main script) reads its spec on stdin.
        """
        process = subprocess.Popen(
            [sys.executable, "-m", "aegaeon.instance.worker"],
            stdin=subprocess.PIPE,
            env={**os.environ, **spec.env},  # which devices it sees (aegaeon/instance/devices.py)
        )
        process.stdin.write(pickle.dumps(spec))
        process.stdin.close()
        return cls(spec, process)

    def wait_ready(self) -> WorkerInfo:
        """Block until the engine is built (its error, if building failed); what it registered."""
        self.info = self._call("info")
        return self.info

    def _connect(self) -> zmq.Socket:
        socket = self._context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.spec.address)
        return socket

    def _call(self, method: str, *args):
        with self._lock:
            self._socket.send_pyobj(Call(method, args))
            while not self._socket.poll(LIVENESS_POLL_MS):
                if not self.alive:
                    raise InstanceDied(
                        f"instance {self.spec.name} (pid {self.process.pid}) exited with code "
                        f"{self.process.returncode} during {method}"
                    )
            reply: Reply = self._socket.recv_pyobj()
        if reply.error is not None:
            raise reply.error
        return reply.value

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    # -- the engine's operations (see worker.EngineService) -------------------------------------------

    def register(self, name: str, path: str, pinned: bool = False) -> ModelFacts:
        return self._call("register", name, path, pinned)

    def unregister(self, name: str) -> None:
        self._call("unregister", name)

    def switch(self, model: str) -> SwitchResult | None:
        return self._call("switch", model)

    def prefetch(self, model: str) -> bool:
        return self._call("prefetch", model)

    def resident_models(self) -> list[str]:
        return self._call("resident_models")

    def add_request(self, request_id: str, token_ids: list[int], params: SamplingParams, model: str) -> None:
        self._call("add_request", request_id, token_ids, params, model)

    def step(self) -> list[RequestDelta]:
        return self._call("step")

    def has_unfinished_requests(self, model: str | None = None) -> bool:
        return self._call("has_unfinished_requests", model)

    def place(self, model: str, batch_ids: set[str]) -> list[str]:
        return self._call("place", model, batch_ids)

    def swap_out(self, request_ids: list[str]) -> None:
        self._call("swap_out", request_ids)

    def export_request(self, request_id: str) -> RequestHandoff:
        return self._call("export_request", request_id)

    def import_request(self, handoff: RequestHandoff) -> None:
        self._call("import_request", handoff)

    def abort_request(self, request_id: str) -> None:
        self._call("abort_request", request_id)

    def profile(self, model: str, progress: bool) -> Profile:
        return self._call("profile", model, progress)

    # -- lifecycle -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Ask the worker to exit (kill it if it does not) and release the socket."""
        if self.alive:
            try:
                self._call("shutdown")
            except (InstanceDied, zmq.ZMQError):
                pass
            try:
                self.process.wait(SHUTDOWN_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._socket.close(linger=0)
        address = self.spec.address.removeprefix("ipc://")
        if os.path.exists(address):
            os.unlink(address)
