"""The typed messages between api servers and nodes (ZeroMQ DEALER -> ROUTER, msgpack via msgspec).

An api server sends `Submit` and `Abort`; the node answers each `Submit` with `Accepted` or
`Rejected` (bad input the node caught), then sends the request's cumulative `Output`s and, if it
fails after acceptance, `Failed`. Decoding builds only these records (never arbitrary objects, as
pickle would), so a peer can at worst send something the receiver drops. Errors travel as data, a
class name from `ERROR_CLASSES` with a status, message and parameter, and are raised again on the
receiving side as that class.
"""

from __future__ import annotations

import msgspec

from aegaeon.engine.outputs import RequestOutput
from aegaeon.engine.sampling_params import SamplingParams
from aegaeon.instance.admission import Draining, Overloaded, Shed


class Submit(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams


class Abort(msgspec.Struct, tag=True, frozen=True):
    request_id: str


class Accepted(msgspec.Struct, tag=True, frozen=True):
    request_id: str


class WireError(msgspec.Struct, frozen=True):
    """An error as data: `kind` names a class of `ERROR_CLASSES`; `status` is its HTTP status."""

    kind: str
    status: int
    message: str
    param: str | None = None
    retry_after_s: int | None = None  # Overloaded: when to try again


class Rejected(msgspec.Struct, tag=True, frozen=True):
    """The node refused the request (bad input, overloaded, shutting down)."""

    request_id: str
    error: WireError


class Output(msgspec.Struct, tag=True, frozen=True):
    """A request's output after a step (`output_message` / `request_output` convert it)."""

    request_id: str
    output: RequestOutput


class Failed(msgspec.Struct, tag=True, frozen=True):
    """A running request failed on the node (a RuntimeError, `Shed` under overload)."""

    request_id: str
    error: WireError


ApiMessage = Submit | Abort
NodeMessage = Accepted | Rejected | Output | Failed

# The errors that may cross the wire, most specific first, with their HTTP status; any other error
# travels as the first class it derives from (a RuntimeError at worst).
ERROR_CLASSES: dict[str, tuple[type[BaseException], int]] = {
    "Overloaded": (Overloaded, 429),
    "Draining": (Draining, 503),
    "Shed": (Shed, 503),
    "KeyError": (KeyError, 404),
    "ValueError": (ValueError, 400),
    "RuntimeError": (RuntimeError, 500),
}


class WireDecodeError(ValueError):
    """A payload that is not one of the expected messages."""


def wire_error(error: BaseException, param: str | None = None) -> WireError:
    """An error as it crosses the wire: its own class if allowed, else the first allowed one it derives
    from, its real class name then leading the message."""
    kind, status = next(
        ((name, status) for name, (cls, status) in ERROR_CLASSES.items() if isinstance(error, cls)),
        ("RuntimeError", ERROR_CLASSES["RuntimeError"][1]),
    )
    # KeyError's str() quotes its message: send the message itself.
    message = str(error.args[0]) if len(error.args) == 1 else str(error)
    if type(error).__name__ != kind:
        message = f"{type(error).__name__}: {message}"
    retry = error.retry_after_s if isinstance(error, Overloaded) else None
    return WireError(kind, status, message, param, retry)


def raised_error(error: WireError) -> BaseException:
    """The exception to raise for an error that came over the wire (RuntimeError for an unknown kind)."""
    cls = ERROR_CLASSES.get(error.kind, (RuntimeError, 500))[0]
    if cls is Overloaded and error.retry_after_s is not None:
        return Overloaded(error.message, error.retry_after_s)
    return cls(error.message)


# -- the output record: converted in one place, so its shape can change in one place --------------------


def output_message(output: RequestOutput) -> Output:
    return Output(output.request_id, output)


def request_output(message: Output) -> RequestOutput:
    return message.output


# -- bytes -------------------------------------------------------------------------------------------


_encoder = msgspec.msgpack.Encoder()
_api_decoder = msgspec.msgpack.Decoder(ApiMessage)
_node_decoder = msgspec.msgpack.Decoder(NodeMessage)


def encode(message: ApiMessage | NodeMessage) -> bytes:
    return _encoder.encode(message)


def decode_api_message(payload: bytes) -> ApiMessage:
    """What an api server sent (WireDecodeError if it is not a `Submit` or `Abort`)."""
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
