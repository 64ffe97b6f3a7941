"""The errors a client can act on, each carrying its HTTP status and its OpenAI error `type` and `code`.

Raised where the problem is found (sampling parameters, prompt checks, a node's admission, the api
server's routes) and rendered as `{"error": {"message", "type", "param", "code"}}` by the api server,
which answers anything else as a 500. A parameter error names its field in `param`. Classes keep the
builtin base callers of the offline API catch (`except ValueError`, `except KeyError`).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, ClassVar

# OpenAI error `type` values.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
SERVICE_UNAVAILABLE = "service_unavailable"

# OpenAI error `code` values (OpenAI's own where it has one).
INVALID_VALUE = "invalid_value"
INVALID_JSON = "invalid_json"
INVALID_CONTENT_TYPE = "invalid_content_type"
MISSING_FIELD = "missing_required_parameter"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
MODEL_NOT_FOUND = "model_not_found"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
INVALID_API_KEY = "invalid_api_key"
REQUEST_TOO_LARGE = "request_too_large"
RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"

# The shortest Retry-After a refusal suggests: a client should not hammer an overloaded node.
MIN_RETRY_AFTER_S = 1


class AegaeonError(Exception):
    """An error to report to the client as is: a message, and where it applies the field at fault."""

    status: ClassVar[int] = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type: ClassVar[str] = SERVER_ERROR
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after_s = retry_after_s  # when to try again, for a refusal that may pass

    def __str__(self) -> str:
        return self.message  # KeyError's own __str__ would quote it

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross processes (node -> api server) pickled; keyword fields survive this way.
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[AegaeonError], message: str, fields: dict[str, Any]) -> AegaeonError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(fields)
    return error


class InvalidRequest(AegaeonError, ValueError):
    """The request cannot be served as sent; `param` names the field to change."""

    status = HTTPStatus.BAD_REQUEST
    error_type = INVALID_REQUEST
    default_code = INVALID_VALUE


class ContextLengthExceeded(InvalidRequest):
    """The prompt leaves no room in the model's context, or is over the server's prompt limit."""

    default_code = CONTEXT_LENGTH_EXCEEDED


class Unauthorized(AegaeonError):
    status = HTTPStatus.UNAUTHORIZED
    error_type = AUTHENTICATION
    default_code = INVALID_API_KEY


class NotFound(AegaeonError):
    """No such route."""

    status = HTTPStatus.NOT_FOUND
    error_type = INVALID_REQUEST
    default_code = NOT_FOUND


class ModelNotFound(NotFound, KeyError):
    """No live node serves the model the request names."""

    default_code = MODEL_NOT_FOUND

    def __init__(self, message: str, *, param: str | None = "model", code: str | None = None):
        super().__init__(message, param=param, code=code)


class MethodNotAllowed(AegaeonError):
    status = HTTPStatus.METHOD_NOT_ALLOWED
    error_type = INVALID_REQUEST
    default_code = METHOD_NOT_ALLOWED


class RequestTooLarge(AegaeonError):
    """The request body is over the server's limit."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    error_type = INVALID_REQUEST
    default_code = REQUEST_TOO_LARGE


class RateLimited(AegaeonError):
    """The client sent more requests than its rate allows; `retry_after_s` says when it may again."""

    status = HTTPStatus.TOO_MANY_REQUESTS
    error_type = RATE_LIMIT
    default_code = RATE_LIMIT_EXCEEDED


class Overloaded(RateLimited, RuntimeError):
    """A node refused a request: too many of its model's requests wait already."""

    def __init__(self, message: str, retry_after_s: float = MIN_RETRY_AFTER_S):
        super().__init__(message, retry_after_s=retry_after_s)


class Unavailable(AegaeonError, RuntimeError):
    """Nothing can serve the request right now (no live node, a failed node); it may pass later."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    error_type = SERVICE_UNAVAILABLE
    default_code = SERVICE_UNAVAILABLE


class Draining(Unavailable):
    """The node is shutting down: it finishes what it has but takes nothing new (send it elsewhere)."""


class Shed(Unavailable):
    """An accepted request was failed because it waited too long to start (overload shedding)."""


class RequestFailed(AegaeonError, RuntimeError):
    """The node could not finish an accepted request (it fits no KV memory, its instance died...)."""


class InternalError(AegaeonError):
    """A failure of ours (a bug): the client learns only the request id that finds it in the log."""

    def __init__(self, request_id: str):
        super().__init__(f"internal server error (request id {request_id}); see the server log")
        self.request_id = request_id
