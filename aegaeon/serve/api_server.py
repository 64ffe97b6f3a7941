"""The OpenAI-compatible HTTP API: the FastAPI app over a backend, and a uvicorn runner.

The app is assembled here from its parts: guards.py (API keys, rate limit, body size),
error_handlers.py (every failure as an OpenAI-format error), routes.py (the endpoints) and
streaming.py (SSE bodies from a request's outputs).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping, Sequence

import uvicorn
from fastapi import APIRouter, Depends, FastAPI

from aegaeon.config import ApiLimits
from aegaeon.serve.admin import admin_router
from aegaeon.serve.backend import Backend
from aegaeon.serve.error_handlers import GuardedRoute, install_error_handlers
from aegaeon.serve.guards import BodyLimit, bearer_auth, rate_limit
from aegaeon.serve.rate_limit import RateLimiter
from aegaeon.serve.routes import Routes


def build_app(
    backend: Backend,
    api_keys: Sequence[str] = (),
    limits: ApiLimits | None = None,
    admin_key: str | None = None,
    api_key_weights: Mapping[str, float] | None = None,
) -> FastAPI:
    """The API app; with `api_keys`, every /v1 route and /tokenize, /detokenize need `Bearer KEY`.

    `api_key_weights` (by key id) weighs each key's share of a model's waiting queue (default 1).

    `limits` (default `ApiLimits()`) bounds each request: body bytes, `n`, prompt and output tokens.
    With `admin_key`, the admin routes (admin.py) are served, to holders of that key only.
    """
    limits = ApiLimits() if limits is None else limits
    app = FastAPI(
        title="aegaeon",
        summary="OpenAI-compatible API over many models switched per token",
        version=_package_version(),
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.router.route_class = GuardedRoute
    serving = Routes(backend, limits, api_key_weights or {})
    auth = [Depends(bearer_auth(api_keys))] if api_keys else []
    rate = (
        [Depends(rate_limit(RateLimiter(limits.requests_per_minute)))] if limits.requests_per_minute else []
    )

    v1 = APIRouter(prefix="/v1", dependencies=auth, route_class=GuardedRoute)
    v1.add_api_route(
        "/completions", serving.completions, methods=["POST"], response_model=None, dependencies=rate
    )
    v1.add_api_route(
        "/chat/completions",
        serving.chat_completions,
        methods=["POST"],
        response_model=None,
        dependencies=rate,
    )
    v1.add_api_route("/models", serving.list_models, methods=["GET"])
    v1.add_api_route("/models/{model_id:path}", serving.get_model, methods=["GET"])
    tools = APIRouter(dependencies=auth, route_class=GuardedRoute)
    tools.add_api_route("/tokenize", serving.tokenize, methods=["POST"])
    tools.add_api_route("/detokenize", serving.detokenize, methods=["POST"])
    if admin_key:
        app.include_router(admin_router(backend, admin_key))
    app.include_router(v1)
    app.include_router(tools)
    app.add_api_route("/health", serving.health, methods=["GET"], response_model=None)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, running a callback once it has shut down.

    uvicorn re-raises SIGTERM/SIGINT after its shutdown, so code after `run()` would never run.
    """

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None] | None):
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self.on_shutdown is not None:
            self.on_shutdown()


def serve_http(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    on_shutdown: Callable[[], None] | None = None,
    drain_timeout_s: float | None = None,
) -> None:
    """Serve `app` with uvicorn until interrupted (blocks); `on_shutdown` runs once it has stopped.

    On SIGTERM, requests in flight get `drain_timeout_s` (None: as long as they need) to finish.
    """
    # log_config=None: uvicorn's loggers go through the handlers `aegaeon.logs.configure_logging` set.
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,
        timeout_graceful_shutdown=drain_timeout_s,
    )
    _Server(config, on_shutdown).run()


def _package_version() -> str:
    try:
        return importlib.metadata.version("aegaeon")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"
