"""The api server's view of a node: its models and tokenizers, and generation as asyncio streams.

The node calls back on its instance threads; a request's outputs cross into the event loop through
`loop.call_soon_threadsafe` onto an asyncio queue of its own. Closing a stream before its request
finished (a client went away, a handler was cancelled) aborts the request on the node.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aegaeon.engine.outputs import RequestOutput
    from aegaeon.engine.sampling_params import SamplingParams
    from aegaeon.engine.tokenizer import Tokenizer
    from aegaeon.instance.node import Node


@dataclass(frozen=True)
class ModelInfo:
    """A served model as the API lists it."""

    name: str
    max_model_len: int
    created: int  # Unix seconds: when this backend started serving it


@dataclass(frozen=True)
class Health:
    """Whether the node can take requests; `error` says why not."""

    ok: bool
    error: str | None
    live_requests: int


class RequestStream:
    """A request's cumulative outputs, in order, as an async iterator; errors are raised from it.

    When several outputs are waiting, `__anext__` returns only the newest: each output holds all the
    text and tokens so far, so the ones before it add nothing.
    """

    def __init__(self, node: Node, request_id: str, queue: asyncio.Queue[RequestOutput | BaseException]):
        self._node = node
        self.request_id = request_id
        self._queue = queue
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not isinstance(item, BaseException) and not item.finished and not self._queue.empty():
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def close(self) -> None:
        """Abort the request on the node unless it already finished (idempotent)."""
        if not self.finished:
            self.finished = True
            self._node.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class NodeBackend:
    """What the api server needs from a node; the node stays the caller's to close."""

    def __init__(self, node: Node):
        self.node = node
        created = int(time.time())
        engine = node.instances[0].engine
        self._models = {
            name: ModelInfo(name, served.max_model_len, created) for name, served in engine.models.items()
        }
        # Tokenizers are built once per model by the engine; the api server shares them read-only.
        self._tokenizers = {name: served.tokenizer for name, served in engine.models.items()}

    def models(self) -> list[ModelInfo]:
        return list(self._models.values())

    def model(self, name: str) -> ModelInfo | None:
        return self._models.get(name)

    def tokenizer(self, name: str) -> Tokenizer:
        """The model's tokenizer; KeyError if the model is not served."""
        return self._tokenizers[name]

    def health(self) -> Health:
        error = self.node.error
        if error is not None:
            return Health(False, f"the node has failed: {error}", len(self.node.live))
        if self.node.stopping:
            return Health(False, "the node is stopping", len(self.node.live))
        return Health(True, None, len(self.node.live))

    async def generate(
        self, model: str, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> RequestStream:
        """Submit a request and return its output stream.

        Bad input raises here (ValueError, KeyError for an unknown model, RuntimeError when the node
        has failed), before any output exists, so a caller can still answer with a clean error.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def put(item: RequestOutput | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                # The event loop is closed (the server stopped mid-request): nobody is listening,
                # and raising here would kill the instance thread that called us.
                pass

        self.node.submit(list(prompt_token_ids), params, model, put, put, request_id=request_id)
        return RequestStream(self.node, request_id, queue)

    def abort(self, request_id: str) -> bool:
        return self.node.abort(request_id)
