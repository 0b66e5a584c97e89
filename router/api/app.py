"""HTTP API (litestar): thin handlers over the routing service; every error is one JSON error model."""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response, get, post, put
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers import BaseRouteHandler
from litestar.params import JSONBody
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK, HTTP_500_INTERNAL_SERVER_ERROR, HTTP_503_SERVICE_UNAVAILABLE

from router.api.auth import Authenticator, Principal, caller_of
from router.api.dashboard import dashboard_routes
from router.api.docs import openapi_config
from router.api.limits import routing_request
from router.api.protocol import (
    ActivePolicyRequest,
    ActivePolicyResponse,
    ChatCompletionRequest,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    RewardRequest,
    RewardResponse,
    RouteResponse,
)
from router.api.responses import openai_completion, router_info, sse
from router.db import database_error
from router.errors import BadRequest, RouterError, UnsupportedMediaType
from router.service import RouterService

log = logging.getLogger("llm_router")

DECISION_HEADER = "X-Router-Decision-Id"


EMPTY_BODY = "request body is empty: send a JSON object (content-type: application/json)"


def _error(
    status: int, type_: str, message: str, headers: dict[str, str] | None = None, code: str | None = None
) -> Response[dict[str, Any]]:
    """OpenAI's error shape: `type` the kind of error, `code` a string naming the case (the type when no finer one)."""
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, code=code or type_))
    return Response(body.model_dump(), status_code=status, headers=headers)


def _router_error(_: Request[Any, Any, Any], exc: RouterError) -> Response[dict[str, Any]]:
    return _error(exc.status, exc.type, exc.message, exc.headers or None, exc.code)


def _validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[dict[str, Any]]:
    details = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    for item in details:
        if not isinstance(item, dict):
            continue
        key, text = item.get("key") or "", str(item.get("message"))
        if key == "data" and item.get("source") == "body":  # litestar's way of saying there was no body at all
            return _error(400, "invalid_request_error", EMPTY_BODY, code="empty_body")
        if text.startswith("Input should be a valid dictionary"):
            text = "the body must be a JSON object"
        parts.append(f"{key}: {text}" if key else text)
    message = "; ".join(parts) or str(exc.detail)
    return _error(400, "invalid_request_error", f"invalid request body: {message}", code="invalid_body")


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    if status == 413:
        limit = request.app.state.max_body_bytes
        message = f"request body too large: this router accepts at most {limit} bytes (limits.max_body_bytes)"
        return _error(413, "invalid_request_error", message, exc.headers, code="request_too_large")
    if status == 400 and str(exc.detail).startswith("JSON is malformed"):
        return _error(400, "invalid_request_error", f"invalid JSON body: {exc.detail}", exc.headers, code="invalid_json")
    type_ = "invalid_request_error" if status < 500 else "internal_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    return _error(status, type_, str(exc.detail), exc.headers, code=code)


def _unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    outage = database_error(exc)  # the database went away under a read the service did not wrap: still a 503
    if outage is not None:
        return _error(outage.status, outage.type, outage.message, outage.headers)
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error(HTTP_500_INTERNAL_SERVER_ERROR, "internal_error", "internal error; see the router's log")


async def _authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    authenticator: Authenticator = connection.app.state.authenticator
    principal = authenticator.authenticate(connection.headers.get("authorization"))
    await authenticator.admit(principal)  # several replicas: the rate limit held in the database
    connection.state.caller = principal
    return principal


async def client_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Any valid key (role client or admin); runs before the body is read, so 401 comes before 400."""
    await _authenticate(connection)


async def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    (await _authenticate(connection)).require("admin")


async def json_body_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """A body must be JSON (415 otherwise: a form or text/plain body is never guessed at) and not empty.
    Reads headers only, so it answers before the body is read. Async: litestar runs a sync guard in a
    worker thread, a thread hop on every request."""
    content_type = (connection.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise UnsupportedMediaType(f"content-type {content_type!r} is not supported: send a JSON body with content-type: application/json")
    if connection.headers.get("content-length") == "0":
        raise BadRequest(EMPTY_BODY, code="empty_body")


@post(
    "/v1/chat/completions", status_code=HTTP_200_OK, summary="OpenAI chat completion, routed", guards=[client_guard, json_body_guard]
)
async def chat_completions(
    data: JSONBody[ChatCompletionRequest], service: NamedDependency[RouterService], request: Request[Any, Any, Any]
) -> Response[Any]:
    tenant = caller_of(request).tenant
    routing = routing_request(data, service.config.limits, service.pool)
    if data.stream:
        events, routed = await service.chat_stream(routing, tenant)
        headers = {DECISION_HEADER: routed.decision_id, "Cache-Control": "no-cache"}
        return Stream(sse(events, routed), media_type="text/event-stream", headers=headers)
    body, routed = await service.chat(routing, tenant)
    body = openai_completion(body)
    body["router"] = router_info(routed).model_dump(mode="json")
    return Response(body, headers={DECISION_HEADER: routed.decision_id})


@post("/v1/route", status_code=HTTP_200_OK, summary="The routing decision alone, no generation", guards=[client_guard, json_body_guard])
async def route(
    data: JSONBody[ChatCompletionRequest], service: NamedDependency[RouterService], request: Request[Any, Any, Any]
) -> Response[RouteResponse]:
    if data.stream:
        raise BadRequest("stream: /v1/route returns the decision alone and generates nothing, so it cannot stream; "
                         "send stream=true to /v1/chat/completions", code="stream_not_supported")
    routed = await service.route(routing_request(data, service.config.limits, service.pool), caller_of(request).tenant)
    return Response(RouteResponse(router=router_info(routed)), headers={DECISION_HEADER: routed.decision_id})


@post(
    "/v1/rewards", status_code=HTTP_200_OK, summary="Feedback for a decision: reward in [0,1] or a preference",
    guards=[client_guard, json_body_guard],
)
async def rewards(
    data: JSONBody[RewardRequest], service: NamedDependency[RouterService], request: Request[Any, Any, Any]
) -> RewardResponse:
    preference = (data.winner, data.loser) if data.reward is None else None
    result = await service.feedback(data.decision_id, caller_of(request).tenant, data.reward, preference)  # type: ignore[arg-type]
    return RewardResponse(decision_id=result.decision_id, kind=result.kind, duplicate=result.duplicate)  # type: ignore[arg-type]


@get("/v1/policies/stats", summary="Per-policy and per-backend statistics", guards=[admin_guard])
async def policy_stats(service: NamedDependency[RouterService]) -> dict[str, Any]:
    return await service.stats()


@put(
    "/v1/policies/active", status_code=HTTP_200_OK, summary="Switch the policy that routes `auto` requests",
    guards=[admin_guard, json_body_guard],
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


@get("/v1/models", summary="OpenAI model list: auto and every backend", guards=[client_guard])
async def models(service: NamedDependency[RouterService], request: Request[Any, Any, Any]) -> ModelList:
    names = ["auto", *service.pool.names()]
    return ModelList(data=[ModelCard(id=name, created=request.app.state.started) for name in names])


def _availability(service: RouterService) -> dict[str, Any]:
    states = service.pool.states()
    up = [s.spec.name for s in states if s.down_reason is None]
    down = [{"name": s.spec.name, "base_url": s.spec.base_url, "reason": s.down_reason} for s in states if s.down_reason is not None]
    return {"backends_up": up, "backends_down": down, "active_policy": service.active_policy}


@get("/health", summary="Liveness (always 200 while the process serves), with which backends are down and why")
async def health(service: NamedDependency[RouterService]) -> dict[str, Any]:
    availability = _availability(service)
    return {"status": "degraded" if availability["backends_down"] else "ok", **availability}


@get("/ready", summary="Readiness: 200 while a backend can serve, 503 while none can")
async def ready(service: NamedDependency[RouterService]) -> Response[dict[str, Any]]:
    availability = _availability(service)
    if not service.database_ok:
        return Response({"status": "database_unavailable", **availability}, status_code=HTTP_503_SERVICE_UNAVAILABLE)
    if not service.pool.eligible():
        return Response({"status": "unavailable", **availability}, status_code=HTTP_503_SERVICE_UNAVAILABLE)
    return Response({"status": "ready", **availability})


@get("/metrics", summary="Prometheus metrics", media_type="text/plain; version=0.0.4", guards=[admin_guard])
async def metrics(service: NamedDependency[RouterService]) -> bytes:
    return service.metrics.render()


def create_app(service: RouterService, authenticator: Authenticator | None = None) -> Litestar:
    """`authenticator` defaults to the config's keys, for a server on the config's address."""
    authenticator = authenticator or Authenticator(service.config.auth, service.config.server.host, os.environ)
    if service.clustered:  # several replicas: one bucket per key, in the database
        authenticator.shared_buckets = service.take_rate_token

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await service.start()
        # What start-up built (imported modules, the memory loaded from the database) lives as long as
        # the process: freezing it keeps the cyclic collector's full scans (which made /v1/route's p99
        # at concurrency 32 two and a half times longer) to the objects made since.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await service.close()

    async def provide_service() -> RouterService:
        return service

    return Litestar(
        route_handlers=[
            chat_completions, route, rewards, policy_stats, set_active_policy, backends, config, train_predictors, models, health, ready,
            metrics, *dashboard_routes(admin_guard),
        ],
        dependencies={"service": provide_service},
        state=State({"authenticator": authenticator, "max_body_bytes": service.config.limits.max_body_bytes, "started": int(time.time())}),
        request_max_body_size=service.config.limits.max_body_bytes,
        lifespan=[lifespan],
        exception_handlers={
            RouterError: _router_error,
            ValidationException: _validation_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        openapi_config=openapi_config(),
        logging_config=None,  # the CLI configures logging; handlers log what matters themselves
    )
