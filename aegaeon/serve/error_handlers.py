"""Every failure answered as an OpenAI-format error: the app's exception handlers and guarded routes.

An `AegaeonError` is answered as it says; anything else is our bug: a 500 naming a request id, the
traceback logged under that id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from aegaeon.errors import (
    INVALID_CONTENT_TYPE,
    INVALID_JSON,
    AegaeonError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
)
from aegaeon.serve.errors import describe_validation_errors, error_body, error_response
from aegaeon.serve.guards import BodyTooLarge
from aegaeon.serve.protocol import new_id

logger = logging.getLogger(__name__)

REQUEST_ID_PREFIX = "req"


def install_error_handlers(app: FastAPI) -> None:
    async def aegaeon_error(_: Request, exc: AegaeonError) -> JSONResponse:
        return error_response(exc)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; the OpenAI API (and its clients' error classes) use 400.
        errors = exc.errors()
        first = errors[0] if errors else {}
        if tuple(first.get("loc", ())) == ("body",) and isinstance(first.get("input"), bytes):
            # FastAPI parses JSON only when the Content-Type says so, and hands over the raw bytes otherwise.
            return error_response(_not_json(request))
        return error_response(describe_validation_errors(errors))

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        too_large = exc if isinstance(exc, BodyTooLarge) else exc.__cause__
        if isinstance(too_large, BodyTooLarge):  # itself, or wrapped by FastAPI's body reader
            return error_response(too_large.error)
        if exc.status_code == NotFound.status:
            return error_response(NotFound(f"no route {request.method} {request.url.path}"))
        if exc.status_code == MethodNotAllowed.status:
            return error_response(MethodNotAllowed(f"{request.url.path} does not accept {request.method}"))
        if exc.status_code == InvalidRequest.status and exc.__cause__ is not None:
            # FastAPI's "There was an error parsing the body", raised from what json.loads failed on.
            return error_response(_unparsable_body(exc.__cause__))
        body = error_body(str(exc.detail), InvalidRequest.error_type)
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # A last resort (routes answer their own failures, see GuardedRoute): Starlette re-raises
        # after this, and uvicorn then drops the connection.
        return _internal_error(request, exc)

    app.add_exception_handler(AegaeonError, aegaeon_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


def internal_error(error: BaseException, request_id: str, where: str) -> InternalError:
    """Log an unexpected failure with its traceback under `request_id`; the error the client gets."""
    logger.error("internal error on %s (request id %s)", where, request_id, exc_info=error)
    return InternalError(request_id)


def _internal_error(request: Request, exc: BaseException) -> JSONResponse:
    where = f"{request.method} {request.url.path}"
    return error_response(internal_error(exc, new_id(REQUEST_ID_PREFIX), where))


def _not_json(request: Request) -> InvalidRequest:
    content_type = request.headers.get("content-type")
    got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
    return InvalidRequest(
        f"the request body must be a JSON object sent with 'Content-Type: application/json' (got {got})",
        code=INVALID_CONTENT_TYPE,
    )


def _unparsable_body(cause: BaseException) -> InvalidRequest:
    """A body json.loads could not read, for a reason other than its syntax (answered by FastAPI)."""
    if isinstance(cause, RecursionError):
        message = "the request body is nested too deeply to parse; send a flatter JSON object"
    elif isinstance(cause, UnicodeDecodeError):
        where = f"{cause.reason} at byte {cause.start}"
        message = f"the request body is not valid UTF-8 ({where}); send JSON encoded as UTF-8"
    else:
        message = f"the request body is not valid JSON: {cause}"
    return InvalidRequest(message, code=INVALID_JSON)


class GuardedRoute(APIRoute):
    """A route that answers an unexpected exception with a 500 itself.

    Left to Starlette, the exception would reach uvicorn, which closes the connection: a client
    reusing it (keep-alive) would see its next request reset.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (AegaeonError, StarletteHTTPException, RequestValidationError):
                raise  # answered by their handlers
            except Exception as exc:  # noqa: BLE001 - anything else is our bug: log it, answer 500
                return _internal_error(request, exc)

        return guarded
