"""The typed messages between api servers and nodes (ZeroMQ DEALER -> ROUTER, msgpack via msgspec).

An api server sends `Submit` and `Abort`; the node answers each `Submit` with `Accepted` or
`Rejected` (bad input the node caught), then sends the request's `Output`s (each holds what is new
since the previous one) and, if it fails after acceptance, `Failed`. The admin commands `AddModel` and
`RemoveModel` (the live model registry) are answered with `Done`. Decoding builds only these
records (never arbitrary objects, as pickle would), so a peer can at worst send something the
receiver drops. Errors travel as data, a class name from `ERROR_CLASSES` with a status, message,
parameter, code and retry delay, and are raised again on the receiving side as that class.
"""

from __future__ import annotations

import msgspec

from aegaeon import errors
from aegaeon.config import DEFAULT_KEY_WEIGHT, DEFAULT_PRIORITY
from aegaeon.engine.outputs import RequestDelta
from aegaeon.engine.sampling_params import SamplingParams


class Submit(msgspec.Struct, tag=True, frozen=True):
    """A request to run; one whose node went silent comes again with what it generated so far."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # By choice index: the tokens the client has already received, and the choices that finished.
    output_token_ids: dict[int, list[int]] = msgspec.field(default_factory=dict)
    finish_reasons: dict[int, str] = msgspec.field(default_factory=dict)
    # The id of the API key it came with (None: no keys) and that key's weight in fair sharing.
    key: str | None = None
    key_weight: float = DEFAULT_KEY_WEIGHT


class Abort(msgspec.Struct, tag=True, frozen=True):
    request_id: str


class AddModel(msgspec.Struct, tag=True, frozen=True):
    """Serve one more model (the live registry); answered with `Done` once the node takes its requests."""

    command_id: str
    name: str
    path: str
    ttft_s: float | None = None
    tbt_s: float | None = None
    pinned: bool = False
    priority: float = DEFAULT_PRIORITY


class RemoveModel(msgspec.Struct, tag=True, frozen=True):
    """Stop serving a model once its requests in flight finished (waiting up to `timeout_s`)."""

    command_id: str
    name: str
    timeout_s: float


class Accepted(msgspec.Struct, tag=True, frozen=True):
    request_id: str


class WireError(msgspec.Struct, frozen=True):
    """An error as data: `kind` names a class of `ERROR_CLASSES`; `status` is its HTTP status."""

    kind: str
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None  # a refusal that may pass: when to try again


class Rejected(msgspec.Struct, tag=True, frozen=True):
    """The node refused the request (bad input, overloaded, shutting down)."""

    request_id: str
    error: WireError


class Output(msgspec.Struct, tag=True, frozen=True):
    """What a step added to a request (`output_message` / `request_output` convert it)."""

    request_id: str
    output: RequestDelta


class Failed(msgspec.Struct, tag=True, frozen=True):
    """A running request failed on the node (a RuntimeError, `Shed` under overload)."""

    request_id: str
    error: WireError


class Done(msgspec.Struct, tag=True, frozen=True):
    """A command (`AddModel`, `RemoveModel`) finished: `error` says why it failed, None if it did not."""

    command_id: str
    error: WireError | None = None


ApiMessage = Submit | Abort | AddModel | RemoveModel
NodeMessage = Accepted | Rejected | Output | Failed | Done

# The errors that may cross the wire, most specific first; any other error travels as the first class
# it derives from (a RuntimeError at worst). aegaeon's own errors carry their HTTP status.
ERROR_CLASSES: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (
        errors.ContextLengthExceeded,
        errors.InvalidRequest,
        errors.ModelNotFound,
        errors.NotFound,
        errors.Overloaded,
        errors.RateLimited,
        errors.Draining,
        errors.Shed,
        errors.Unavailable,
        errors.RequestFailed,
        KeyError,
        ValueError,
        RuntimeError,
    )
}
# The status of an error that is not one of aegaeon's own.
BUILTIN_STATUS = {"KeyError": 404, "ValueError": 400, "RuntimeError": 500}


class WireDecodeError(ValueError):
    """A payload that is not one of the expected messages."""


def wire_error(error: BaseException) -> WireError:
    """An error as it crosses the wire: its own class if allowed, else the first allowed one it derives
    from, its real class name then leading the message."""
    kind = next((name for name, cls in ERROR_CLASSES.items() if isinstance(error, cls)), "RuntimeError")
    if isinstance(error, errors.AegaeonError):
        message, status = error.message, int(error.status)
        param, code, retry = error.param, error.code, error.retry_after_s
    else:
        # KeyError's str() quotes its message: send the message itself.
        message = str(error.args[0]) if len(error.args) == 1 else str(error)
        status, param, code, retry = BUILTIN_STATUS.get(kind, 500), None, None, None
    if type(error).__name__ != kind:
        message = f"{type(error).__name__}: {message}"
    return WireError(kind, status, message, param, code, retry)


def raised_error(error: WireError) -> BaseException:
    """The exception to raise for an error that came over the wire (RuntimeError for an unknown kind)."""
    cls = ERROR_CLASSES.get(error.kind, RuntimeError)
    if not issubclass(cls, errors.AegaeonError):
        return cls(error.message)
    # Built as its class's own constructor would, whatever that constructor's signature.
    raised = cls.__new__(cls)
    Exception.__init__(raised, error.message)
    raised.message, raised.param, raised.code = error.message, error.param, error.code
    raised.retry_after_s = error.retry_after_s
    return raised


# -- the output record: converted in one place, so its shape can change in one place --------------------


def output_message(output: RequestDelta) -> Output:
    return Output(output.request_id, output)


def request_output(message: Output) -> RequestDelta:
    return message.output


# -- bytes -------------------------------------------------------------------------------------------


_encoder = msgspec.msgpack.Encoder()
_api_decoder = msgspec.msgpack.Decoder(ApiMessage)
_node_decoder = msgspec.msgpack.Decoder(NodeMessage)


def encode(message: ApiMessage | NodeMessage) -> bytes:
    return _encoder.encode(message)


def decode_api_message(payload: bytes) -> ApiMessage:
    """What an api server sent (WireDecodeError if it is not one of the api server's messages)."""
    return _decode(_api_decoder, payload)


def decode_node_message(payload: bytes) -> NodeMessage:
    """What a node sent (WireDecodeError if it is not one of the node's messages)."""
    return _decode(_node_decoder, payload)


def _decode(decoder: msgspec.msgpack.Decoder, payload: bytes):
    try:
        return decoder.decode(payload)
    except (msgspec.MsgspecError, ValueError, TypeError) as error:
        # ValueError / TypeError: a record's own checks (SamplingParams.__post_init__) refused it.
        raise WireDecodeError(str(error)) from None
