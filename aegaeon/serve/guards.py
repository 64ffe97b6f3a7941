"""What a request passes before its route: the API key, the per-client rate limit, the body size."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aegaeon.config import api_key_id
from aegaeon.errors import RateLimited, RequestTooLarge, Unauthorized
from aegaeon.serve.errors import error_response
from aegaeon.serve.rate_limit import RateLimiter


def rate_limit(limiter: RateLimiter) -> Callable[[Request], Coroutine[Any, Any, None]]:
    async def within_rate(request: Request) -> None:
        # The key identifies the client where keys are required; otherwise its address does.
        client = request.headers.get("authorization") or (request.client.host if request.client else "")
        wait_s = limiter.take(client)
        if wait_s > 0:
            rpm = int(limiter.capacity)
            raise RateLimited(
                f"rate limit of {rpm} requests per minute reached; retry in {wait_s:.1f} s",
                retry_after_s=wait_s,
            )

    return within_rate


def bearer_auth(
    api_keys: Sequence[str], what: str = "API key"
) -> Callable[[Request], Coroutine[Any, Any, None]]:
    expected = [f"Bearer {key}".encode() for key in api_keys]
    ids = [api_key_id(key) for key in api_keys]

    async def require_key(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        # Every key is compared, in constant time each: how long this takes says nothing of the keys.
        matches = [hmac.compare_digest(given, key) for key in expected]
        if not any(matches):
            raise Unauthorized(f"invalid or missing {what}: send the header 'Authorization: Bearer <key>'")
        # The routes know the client by its key's id (fair sharing, logs), never by the key itself.
        request.state.api_key_id = ids[matches.index(True)]

    return require_key


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once a body grows past the limit; FastAPI's body reader re-raises it."""

    def __init__(self, error: RequestTooLarge):
        super().__init__(error.status, error.message)
        self.error = error


def _body_too_large(max_bytes: int, declared: int | None = None) -> RequestTooLarge:
    """The 413; `declared`: the body's Content-Length, if it had one."""
    size = f"{declared} bytes, " if declared is not None else ""
    return RequestTooLarge(
        f"the request body is {size}over this server's limit of {max_bytes} bytes (max_body_bytes); "
        "send a smaller request"
    )


class BodyLimit:
    """ASGI middleware refusing a request body over `max_bytes` with a 413.

    A declared Content-Length over the limit is refused before anything is read; a body sent without
    one (chunked) is counted as it arrives and refused once it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            response = error_response(_body_too_large(self.max_bytes, declared))
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(_body_too_large(self.max_bytes))
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server refuses a malformed length before the app runs
    return None
