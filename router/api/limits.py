"""Request limits, and the chat request as the service takes it."""

from __future__ import annotations

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


def routing_request(request: ChatCompletionRequest, limits: LimitsConfig) -> RoutingRequest:
    """Checked against the limits; the backend gets the body without `router`, with the router's output
    cap when the client set none."""
    check_limits(request, limits)
    body = request.model_dump(exclude={"router"}, exclude_none=True)
    if request.output_token_limit() is None:
        body["max_tokens"] = limits.max_tokens
    options = request.router or RouterOptions()
    return RoutingRequest(
        query=request.query_text(),
        prompt=request.prompt_text(),
        model=request.model,
        output_limit=request.output_token_limit() or limits.max_tokens,
        body=body,
        policy=options.policy,
        max_cost_usd=options.max_cost_usd,
    )
