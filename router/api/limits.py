"""Request limits, and the chat request as the service takes it."""

from __future__ import annotations

from backends.client import FIT_MAX_TOKENS, estimate_tokens
from backends.pool import BackendPool
from router.api.protocol import ChatCompletionRequest, RouterOptions
from router.config import LimitsConfig
from router.errors import BadRequest
from router.service import RoutingRequest


def check_limits(request: ChatCompletionRequest, limits: LimitsConfig) -> None:
    if len(request.messages) > limits.max_messages:
        raise BadRequest(f"messages: {len(request.messages)} messages; this router accepts at most {limits.max_messages}")
    longest = max(len(m.text()) for m in request.messages)
    if longest > limits.max_message_chars:
        raise BadRequest(f"messages: a message has {longest} characters; this router accepts at most {limits.max_message_chars}")
    asked = max(request.max_tokens or 0, request.max_completion_tokens or 0)
    if asked > limits.max_tokens:
        raise BadRequest(f"max_tokens: {asked} asked; this router allows at most {limits.max_tokens}")


def check_context(request: ChatCompletionRequest, pool: BackendPool) -> None:
    """A prompt that fits no backend's context (as the backends reported it) is refused before any call:
    a pinned backend's context, or for a routed request every backend's (an unknown context fits)."""
    tokens = estimate_tokens(request.prompt_text())
    if request.model != "auto":
        states = [pool.state(request.model)] if request.model in pool else []  # an unknown backend: the service's 404
    else:
        states = pool.states()
    if not states or any(s.fits(tokens) for s in states):
        return
    largest = max(s.max_model_len or 0 for s in states)
    where = f"backend {request.model}'s context is" if request.model != "auto" else "the largest context of this router's backends is"
    raise BadRequest(
        f"messages: the prompt has about {tokens} tokens (characters / 4) and {where} {largest} tokens; shorten the prompt",
        code="context_length_exceeded",
    )


def routing_request(request: ChatCompletionRequest, limits: LimitsConfig, pool: BackendPool | None = None) -> RoutingRequest:
    """Checked against the limits (and, given the pool, the backends' contexts); the backend gets the body
    without `router`. When the client set no output limit, the body carries the router's cap
    (`limits.max_tokens`) marked so that each backend's client lowers it to what fits its context."""
    check_limits(request, limits)
    if pool is not None:
        check_context(request, pool)
    body = request.model_dump(exclude={"router"}, exclude_none=True)
    body.pop(FIT_MAX_TOKENS, None)  # only the router sets it
    if request.output_token_limit() is None:
        body["max_tokens"] = limits.max_tokens
        body[FIT_MAX_TOKENS] = True
    options = request.router or RouterOptions()
    return RoutingRequest(
        query=request.query_text(),
        prompt=request.prompt_text(),
        model=request.model,
        output_limit=request.output_token_limit() or limits.max_tokens,
        body=body,
        policy=options.policy,
        max_cost_usd=options.max_cost_usd,
        mode=options.mode,
        judge=options.judge,
    )
