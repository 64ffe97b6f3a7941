"""The admin routes: the live model registry, behind an admin key of its own (not an API key).

`POST /v1/admin/models` registers a model and answers once the nodes serve it (201, its model card);
`DELETE /v1/admin/models/{name}` refuses new requests for it at once, lets those in flight finish,
then removes it. Without an admin key configured the routes do not exist (404); a wrong or missing
key gets 401.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from aegaeon.config import DEFAULT_PRIORITY
from aegaeon.serve.backend import Backend
from aegaeon.serve.error_handlers import GuardedRoute
from aegaeon.serve.guards import bearer_auth
from aegaeon.serve.metadata import ModelRecord
from aegaeon.serve.routes import model_card


class AddModelRequest(BaseModel):
    """A model to register: its name, its weights (a local HF directory or a hub id) and its settings."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting must not be silently dropped

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    ttft_s: float | None = Field(default=None, gt=0)  # SLO targets; None: the node's default
    tbt_s: float | None = Field(default=None, gt=0)
    # A weight: the model's share of decode rounds and its place in prefill order (docs/scheduling.md).
    priority: float = Field(default=DEFAULT_PRIORITY, gt=0, allow_inf_nan=False, strict=True)
    pinned: StrictBool = False  # kept in every node's host model cache while registered


class AdminRoutes:
    def __init__(self, backend: Backend):
        self.backend = backend

    async def add_model(self, body: AddModelRequest) -> JSONResponse:
        record = ModelRecord(**body.model_dump())
        info = await self.backend.add_model(record)
        return JSONResponse(model_card(info).model_dump(), status_code=HTTPStatus.CREATED)

    async def remove_model(self, name: str) -> JSONResponse:
        await self.backend.remove_model(name)
        return JSONResponse({"id": name, "object": "model", "deleted": True})


def admin_router(backend: Backend, admin_key: str) -> APIRouter:
    """The admin routes, each needing `Authorization: Bearer <admin_key>`."""
    routes = AdminRoutes(backend)
    router = APIRouter(
        prefix="/v1/admin",
        dependencies=[Depends(bearer_auth([admin_key], "admin key"))],
        route_class=GuardedRoute,
    )
    router.add_api_route("/models", routes.add_model, methods=["POST"], response_model=None)
    router.add_api_route("/models/{name:path}", routes.remove_model, methods=["DELETE"], response_model=None)
    return router
