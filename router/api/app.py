"""HTTP API (litestar): thin handlers over the routing service; every error is one JSON error model."""

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

from router.api.auth import Authenticator, Principal
from router.api.limits import routing_request
from router.api.protocol import (
    ActivePolicyRequest,
    ActivePolicyResponse,
    ChatCompletionRequest,
    ErrorBody,
    ErrorResponse,
    RewardRequest,
    RewardResponse,
    RouteResponse,
)
from router.api.responses import router_info, sse
from router.errors import RouterError
from router.service import RouterService

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
    data: JSONBody[ChatCompletionRequest], service: NamedDependency[RouterService], caller: NamedDependency[Principal]
) -> Response[Any]:
    request = routing_request(data, service.config.limits)
    if data.stream:
        events, routed = await service.chat_stream(request, caller.tenant)
        headers = {DECISION_HEADER: routed.decision_id, "Cache-Control": "no-cache"}
        return Stream(sse(events, routed), media_type="text/event-stream", headers=headers)
    body, routed = await service.chat(request, caller.tenant)
    body["router"] = router_info(routed).model_dump(mode="json")
    return Response(body, headers={DECISION_HEADER: routed.decision_id})


@post("/v1/route", status_code=HTTP_200_OK, summary="The routing decision alone, no generation", guards=[client_guard])
async def route(
    data: JSONBody[ChatCompletionRequest], service: NamedDependency[RouterService], caller: NamedDependency[Principal]
) -> Response[RouteResponse]:
    routed = await service.route(routing_request(data, service.config.limits), caller.tenant)
    return Response(RouteResponse(router=router_info(routed)), headers={DECISION_HEADER: routed.decision_id})


@post(
    "/v1/rewards", status_code=HTTP_200_OK, summary="Feedback for a decision: reward in [0,1] or a preference",
    guards=[client_guard],
)
async def rewards(
    data: JSONBody[RewardRequest], service: NamedDependency[RouterService], caller: NamedDependency[Principal]
) -> RewardResponse:
    preference = (data.winner, data.loser) if data.reward is None else None
    result = await service.feedback(data.decision_id, caller.tenant, data.reward, preference)  # type: ignore[arg-type]
    return RewardResponse(decision_id=result.decision_id, kind=result.kind, duplicate=result.duplicate)  # type: ignore[arg-type]


@get("/v1/policies/stats", summary="Per-policy and per-backend statistics", guards=[admin_guard])
async def policy_stats(service: NamedDependency[RouterService]) -> dict[str, Any]:
    return await service.stats()


@put(
    "/v1/policies/active", status_code=HTTP_200_OK, summary="Switch the policy that routes `auto` requests",
    guards=[admin_guard],
)
async def set_active_policy(data: JSONBody[ActivePolicyRequest], service: NamedDependency[RouterService]) -> ActivePolicyResponse:
    service.set_active_policy(data.policy)
    return ActivePolicyResponse(active_policy=service.active_policy)


@get("/v1/backends", summary="Backends, their health and vLLM queue depth", guards=[admin_guard])
async def backends(service: NamedDependency[RouterService]) -> dict[str, Any]:
    return {"backends": service.pool.describe()}


@get("/v1/config", summary="The configuration in effect (key hashes left out)", guards=[admin_guard])
async def config(service: NamedDependency[RouterService]) -> dict[str, Any]:
    return service.config.model_dump(mode="json", exclude={"auth": {"keys": {"__all__": {"key_sha256"}}}})


@post("/v1/predictors/train", status_code=HTTP_200_OK, summary="Retrain the predictors now (admin)", guards=[admin_guard])
async def train_predictors(service: NamedDependency[RouterService]) -> dict[str, Any]:
    return {"runs": await service.train("api")}


@get("/health", summary="Liveness and backend availability")
async def health(service: NamedDependency[RouterService]) -> dict[str, Any]:
    up = [s.spec.name for s in service.pool.eligible()]
    return {"status": "ok" if up else "degraded", "backends_up": up, "active_policy": service.active_policy}


@get("/metrics", summary="Prometheus metrics", media_type="text/plain; version=0.0.4", guards=[admin_guard])
async def metrics(service: NamedDependency[RouterService]) -> bytes:
    return service.metrics.render()


def create_app(service: RouterService, authenticator: Authenticator | None = None) -> Litestar:
    """`authenticator` defaults to the config's keys, for a server on the config's address."""
    authenticator = authenticator or Authenticator(service.config.auth, service.config.server.host, os.environ)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.close()

    async def provide_service() -> RouterService:
        return service

    return Litestar(
        route_handlers=[
            chat_completions, route, rewards, policy_stats, set_active_policy, backends, config, train_predictors, health, metrics,
        ],
        dependencies={"service": provide_service, "caller": provide_caller},
        state=State({"authenticator": authenticator}),
        request_max_body_size=service.config.limits.max_body_bytes,
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
