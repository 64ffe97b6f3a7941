"""The typed messages between api servers and nodes (ZeroMQ DEALER -> ROUTER, pickled records).

An api server sends `Submit` and `Abort`; the node answers each `Submit` with `Accepted` or
`Rejected` (bad input the node caught, with the error to raise), then sends the request's
`Output`s (each holds what is new since the previous one) and, if it fails after acceptance, `Failed`.
"""

from __future__ import annotations

from dataclasses import dataclass

from aegaeon.engine.outputs import RequestDelta
from aegaeon.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Submit:
    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Accepted:
    request_id: str


@dataclass(frozen=True)
class Rejected:
    """The node refused the request; `error` is a ValueError, KeyError or RuntimeError to raise."""

    request_id: str
    error: BaseException


@dataclass(frozen=True)
class Output:
    output: RequestDelta

    @property
    def request_id(self) -> str:
        return self.output.request_id


@dataclass(frozen=True)
class Failed:
    """A running request failed on the node; `error` says why (a RuntimeError, `Shed` under overload)."""

    request_id: str
    error: BaseException


NodeMessage = Accepted | Rejected | Output | Failed
ApiMessage = Submit | Abort
