"""Every failure answered as an OpenAI-format error: the app's exception handlers and guarded routes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from aegaeon.serve.errors import (
    INVALID_CONTENT_TYPE,
    INVALID_JSON,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    SERVER_ERROR,
    APIError,
    bad_request,
    describe_validation_errors,
)
from aegaeon.serve.guards import BodyTooLarge

logger = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return exc.response(headers)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; the OpenAI API (and its clients' error classes) use 400.
        errors = exc.errors()
        first = errors[0] if errors else {}
        if tuple(first.get("loc", ())) == ("body",) and isinstance(first.get("input"), bytes):
            # FastAPI parses JSON only when the Content-Type says so, and hands over the raw bytes otherwise.
            return _not_json(request).response()
        message, param, code = describe_validation_errors(errors)
        return bad_request(message, param, code).response()

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        too_large = exc if isinstance(exc, BodyTooLarge) else exc.__cause__
        if isinstance(too_large, BodyTooLarge):  # itself, or wrapped by FastAPI's body reader
            return too_large.error.response()
        if exc.status_code == 404:
            message, code = f"no route {request.method} {request.url.path}", NOT_FOUND
        elif exc.status_code == 405:
            message, code = f"{request.url.path} does not accept {request.method}", METHOD_NOT_ALLOWED
        elif exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's "There was an error parsing the body", raised from what json.loads failed on.
            return _unparsable_body(exc.__cause__).response()
        else:
            message, code = str(exc.detail), None
        return APIError(exc.status_code, message, code=code).response(getattr(exc, "headers", None))

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # A last resort (routes answer their own failures, see GuardedRoute): Starlette re-raises
        # after this, and uvicorn then drops the connection.
        return _internal_error(request, exc)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


def _not_json(request: Request) -> APIError:
    content_type = request.headers.get("content-type")
    got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
    return bad_request(
        f"the request body must be a JSON object sent with 'Content-Type: application/json' (got {got})",
        None,
        INVALID_CONTENT_TYPE,
    )


def _unparsable_body(cause: BaseException) -> APIError:
    """A body json.loads could not read, for a reason other than its syntax (answered by FastAPI)."""
    if isinstance(cause, RecursionError):
        message = "the request body is nested too deeply to parse; send a flatter JSON object"
    elif isinstance(cause, UnicodeDecodeError):
        where = f"{cause.reason} at byte {cause.start}"
        message = f"the request body is not valid UTF-8 ({where}); send JSON encoded as UTF-8"
    else:
        message = f"the request body is not valid JSON: {cause}"
    return bad_request(message, None, INVALID_JSON)


def _internal_error(request: Request, exc: BaseException) -> JSONResponse:
    logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, "internal server error; see the server log", SERVER_ERROR).response()


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
            except (APIError, StarletteHTTPException, RequestValidationError):
                raise  # answered by their handlers
            except Exception as exc:  # noqa: BLE001 - anything else is our bug: log it, answer 500
                return _internal_error(request, exc)

        return guarded
