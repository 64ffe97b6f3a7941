"""Errors as the client sees them: an `AegaeonError` rendered in the OpenAI format with its HTTP status.

`{"error": {"message", "type", "param", "code"}}`; a refusal that may pass later says when in
`Retry-After`, a 500 names its request id in `X-Request-Id` (and the message) to find it in the log.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse

from aegaeon.errors import (
    INVALID_JSON,
    INVALID_VALUE,
    MISSING_FIELD,
    AegaeonError,
    InternalError,
    InvalidRequest,
)

REQUEST_ID_HEADER = "X-Request-Id"

# Pydantic's error types for a body that is JSON but not an object (`[1, 2]`, `null`, `"text"`).
_NOT_AN_OBJECT = ("model_attributes_type", "model_type", "dict_type")
# Pydantic phrases its errors for developers ("Value error, ..."); the prefix adds nothing for a client.
_VALUE_ERROR_PREFIX = "Value error, "


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:  # noqa: A002
    """The JSON body of an OpenAI error."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def body_of(error: AegaeonError) -> dict[str, Any]:
    return error_body(error.message, error.error_type, error.param, error.code)


def error_response(error: AegaeonError) -> JSONResponse:
    """The error's status and OpenAI body, with the headers its kind calls for."""
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = retry_after_header(error.retry_after_s)
    if error.status == HTTPStatus.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(error, InternalError):
        headers[REQUEST_ID_HEADER] = error.request_id
    return JSONResponse(body_of(error), status_code=error.status, headers=headers)


def retry_after_header(wait_s: float) -> str:
    """Retry-After in whole seconds, rounded up so a client that obeys it is let in."""
    return str(max(1, math.ceil(wait_s)))


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


def describe_validation_errors(errors: Sequence[dict[str, Any]]) -> InvalidRequest:
    """A 400 whose message names each bad field and what was expected; `param` is the first field."""
    if not errors:
        return InvalidRequest("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return InvalidRequest(
            f"the request body is not valid JSON{': ' + detail if detail else ''}", code=INVALID_JSON
        )
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
    return InvalidRequest("; ".join(dict.fromkeys(messages)), param=param, code=code)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
