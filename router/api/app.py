"""HTTP API (litestar): thin handlers over the routing engine; every error is one JSON error model."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response, get, post, put
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.params import JSONBody
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK, HTTP_500_INTERNAL_SERVER_ERROR

from router.auth import Authenticator, Principal
from router.engine import RoutingEngine
from router.errors import RouterError
from router.protocol import (
    ActivePolicyRequest,
    ActivePolicyResponse,
    ChatCompletionRequest,
    ErrorBody,
    ErrorResponse,
    RewardRequest,
    RewardResponse,
    RouteResponse,
)

log = logging.getLogger("llm_router")

DECISION_HEADER = "X-Router-Decision-Id"


def _error(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> Response[dict[str, Any]]:
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, code=status))
    return Response(body.model_dump(), status_code=status, headers=headers)


def _router_error(_: Request[Any, Any, Any], exc: RouterError) -> Response[dict[str, Any]]:
    return _error(exc.status, exc.type, exc.message, exc.headers or None)


def _validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[dict[str, Any]]:
    details = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    for item in details:
        if isinstance(item, dict):
            key = item.get("key") or ""
            parts.append(f"{key}: {item.get('message')}" if key else str(item.get("message")))
    message = "; ".join(parts) or str(exc.detail)
    return _error(400, "invalid_request_error", f"invalid request body: {message}")


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    return _error(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "internal_error", str(exc.detail), exc.headers)


def _unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error(HTTP_500_INTERNAL_SERVER_ERROR, "internal_error", "internal error; see the router's log")


def _authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    authenticator: Authenticator = connection.app.state.authenticator
    principal = authenticator.authenticate(connection.headers.get("authorization"))
    connection.state.caller = principal
    return principal


def client_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Any valid key (role client or admin); runs before the body is read, so 401 comes before 400."""
    _authenticate(connection)


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    _authenticate(connection).require("admin")


async def provide_caller(request: Request[Any, Any, Any]) -> Principal:
    return request.state.caller


@post("/v1/chat/completions", status_code=HTTP_200_OK, summary="OpenAI chat completion, routed", guards=[client_guard])
async def chat_completions(
    data: JSONBody[ChatCompletionRequest], engine: NamedDependency[RoutingEngine], caller: NamedDependency[Principal]
) -> Response[Any]:
    if data.stream:
        events, info = await engine.chat_stream(data, caller)
        return Stream(events, media_type="text/event-stream", headers={DECISION_HEADER: info.decision_id, "Cache-Control": "no-cache"})
    body, info = await engine.chat(data, caller)
    return Response(body, headers={DECISION_HEADER: info.decision_id})


@post("/v1/route", status_code=HTTP_200_OK, summary="The routing decision alone, no generation", guards=[client_guard])
async def route(
    data: JSONBody[ChatCompletionRequest], engine: NamedDependency[RoutingEngine], caller: NamedDependency[Principal]
) -> Response[RouteResponse]:
    info = await engine.route(data, caller)
    return Response(RouteResponse(router=info), headers={DECISION_HEADER: info.decision_id})


@post(
    "/v1/rewards", status_code=HTTP_200_OK, summary="Feedback for a decision: reward in [0,1] or a preference",
    guards=[client_guard],
)
async def rewards(
    data: JSONBody[RewardRequest], engine: NamedDependency[RoutingEngine], caller: NamedDependency[Principal]
) -> RewardResponse:
    return await engine.feedback(data, caller)


@get("/v1/policies/stats", summary="Per-policy and per-backend statistics", guards=[admin_guard])
async def policy_stats(engine: NamedDependency[RoutingEngine]) -> dict[str, Any]:
    return await engine.stats()


@put(
    "/v1/policies/active", status_code=HTTP_200_OK, summary="Switch the policy that routes `auto` requests",
    guards=[admin_guard],
)
async def set_active_policy(data: JSONBody[ActivePolicyRequest], engine: NamedDependency[RoutingEngine]) -> ActivePolicyResponse:
    engine.set_active_policy(data.policy)
    return ActivePolicyResponse(active_policy=engine.active_policy)


@get("/v1/backends", summary="Backends, their health and vLLM queue depth", guards=[admin_guard])
async def backends(engine: NamedDependency[RoutingEngine]) -> dict[str, Any]:
    return {"backends": engine.pool.describe()}


@get("/v1/config", summary="The configuration in effect (key hashes left out)", guards=[admin_guard])
async def config(engine: NamedDependency[RoutingEngine]) -> dict[str, Any]:
    return engine.config.model_dump(mode="json", exclude={"auth": {"keys": {"__all__": {"key_sha256"}}}})


@post("/v1/predictors/train", status_code=HTTP_200_OK, summary="Retrain the predictors now (admin)", guards=[admin_guard])
async def train_predictors(engine: NamedDependency[RoutingEngine]) -> dict[str, Any]:
    return {"runs": await engine.train("api")}


@get("/health", summary="Liveness and backend availability")
async def health(engine: NamedDependency[RoutingEngine]) -> dict[str, Any]:
    up = [s.spec.name for s in engine.pool.eligible()]
    return {"status": "ok" if up else "degraded", "backends_up": up, "active_policy": engine.active_policy}


@get("/metrics", summary="Prometheus metrics", media_type="text/plain; version=0.0.4", guards=[admin_guard])
async def metrics(engine: NamedDependency[RoutingEngine]) -> bytes:
    return engine.metrics.render()


def create_app(engine: RoutingEngine, authenticator: Authenticator | None = None) -> Litestar:
    """`authenticator` defaults to the config's keys, for a server on the config's address."""
    authenticator = authenticator or Authenticator(engine.config.auth, engine.config.server.host, os.environ)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.close()

    async def provide_engine() -> RoutingEngine:
        return engine

    return Litestar(
        route_handlers=[
            chat_completions, route, rewards, policy_stats, set_active_policy, backends, config, train_predictors, health, metrics,
        ],
        dependencies={"engine": provide_engine, "caller": provide_caller},
        state=State({"authenticator": authenticator}),
        request_max_body_size=engine.config.limits.max_body_bytes,
        lifespan=[lifespan],
        exception_handlers={
            RouterError: _router_error,
            ValidationException: _validation_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        openapi_config=OpenAPIConfig(title="llm-router", version="0.1.0"),
        logging_config=None,  # the CLI configures logging; handlers log what matters themselves
    )
