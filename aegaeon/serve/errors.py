"""Errors in the OpenAI format: `{"error": {"message", "type", "param", "code"}}`, with their HTTP status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

# Error `type` values the OpenAI API uses.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
SERVER_ERROR = "server_error"
SERVICE_UNAVAILABLE = "service_unavailable"
RATE_LIMIT = "rate_limit_error"

# Error `code` values (OpenAI's where it has one).
MODEL_NOT_FOUND = "model_not_found"
INVALID_API_KEY = "invalid_api_key"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
INVALID_VALUE = "invalid_value"
INVALID_JSON = "invalid_json"
MISSING_FIELD = "missing_required_parameter"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
INVALID_CONTENT_TYPE = "invalid_content_type"
REQUEST_TOO_LARGE = "request_too_large"
RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"

# HTTP 413 Content Too Large (RFC 9110): the body is over the server's limit.
STATUS_REQUEST_TOO_LARGE = 413
# HTTP 429 Too Many Requests: the model's queue is full; Retry-After says when to come back.
STATUS_TOO_MANY_REQUESTS = 429

# Pydantic's error types for a body that is JSON but not an object (`[1, 2]`, `null`, `"text"`).
_NOT_AN_OBJECT = ("model_attributes_type", "model_type", "dict_type")
# Pydantic phrases its errors for developers ("Value error, ..."); the prefix adds nothing for a client.
_VALUE_ERROR_PREFIX = "Value error, "


class APIError(Exception):
    """An error to send the client as is: its status, message and OpenAI error fields."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = INVALID_REQUEST,  # noqa: A002 - the OpenAI field is called `type`
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(
            self.body(), status_code=self.status_code, headers={**self.headers, **(headers or {})}
        )


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:  # noqa: A002
    """The JSON body of an OpenAI error."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = INVALID_VALUE) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def model_not_found(model: str, served: Sequence[str]) -> APIError:
    return APIError(
        404,
        f"The model {model!r} does not exist; served models: {', '.join(served)}",
        INVALID_REQUEST,
        "model",
        MODEL_NOT_FOUND,
    )


def field_path(loc: Sequence[str | int]) -> str:
    """`('body', 'messages', 0, 'role')` -> `messages[0].role`: where the field is in the JSON body."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def describe_validation_errors(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None, str]:
    """A message naming each bad field and what was expected, the first field's name, and a code."""
    if not errors:
        return "invalid request", None, INVALID_VALUE
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON{': ' + detail if detail else ''}", None, INVALID_JSON
    messages = []
    for error in errors:
        path = field_path(error.get("loc", ()))
        if error.get("type") == "missing":
            messages.append(f"'{path}' is required" if path else "a request body is required")
            continue
        text = str(error.get("msg", "invalid value")).removeprefix(_VALUE_ERROR_PREFIX)
        if not path and error.get("type") in _NOT_AN_OBJECT:
            text = "the request body must be a JSON object"
        got = error.get("input")
        suffix = f" (got {_short(got)})" if "input" in error and not isinstance(got, (dict, list)) else ""
        messages.append(f"{path}: {text}{suffix}" if path else f"{text}{suffix}")
    param = field_path(first.get("loc", ())) or None
    code = MISSING_FIELD if first.get("type") == "missing" else INVALID_VALUE
    return "; ".join(dict.fromkeys(messages)), param, code


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
