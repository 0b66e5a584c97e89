"""What goes on the wire from a service result: the `router` object and SSE framing."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from router.api.protocol import CallInfo, RouterInfo
from router.service import Routed, StreamError, StreamEvent


def router_info(routed: Routed) -> RouterInfo:
    record = routed.record
    return RouterInfo(
        decision_id=record.decision_id,
        backend=record.answered_by,
        chosen_backend=record.chosen,
        policy=record.policy,
        propensity=record.propensity,
        cost_usd=routed.cost_usd,
        predicted_cost_usd=record.predicted_cost_usd,
        max_cost_usd=record.max_cost_usd,
        over_budget=record.over_budget,
        failed_backends=[f.backend for f in routed.failures],
        scores=record.scores,
        mode=record.mode,
        calls=[
            CallInfo(role=c.role, backend=c.backend, status=c.status, delivered=c.delivered, score=c.score, cost_usd=c.cost_usd,
                     latency_ms=c.latency_ms)
            for c in routed.calls
        ],
    )


# Which upstream fields reach the client: OpenAI's ChatCompletion / ChatCompletionChunk fields only (plus the
# router's own `router` object), so server-specific fields (vLLM's `prompt_token_ids`, `kv_transfer_params`,
# `prompt_logprobs`, a choice's `stop_reason` and `token_ids`, ...) never leak. One exception: a message's
# `reasoning_content` / `reasoning` (the thinking text of reasoning models, as vLLM and DeepSeek send it).
COMPLETION_FIELDS = frozenset({"id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier"})
CHOICE_FIELDS = frozenset({"index", "message", "delta", "finish_reason", "logprobs"})
MESSAGE_FIELDS = frozenset({
    "role", "content", "refusal", "tool_calls", "function_call", "audio", "annotations", "reasoning_content", "reasoning",
})
USAGE_FIELDS = frozenset({"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details", "completion_tokens_details"})


def _pick(value: Any, fields: frozenset[str]) -> Any:
    return {k: v for k, v in value.items() if k in fields} if isinstance(value, dict) else value


def openai_completion(body: dict[str, Any]) -> dict[str, Any]:
    """A backend's completion or chunk with OpenAI's fields only (see COMPLETION_FIELDS)."""
    public = _pick(body, COMPLETION_FIELDS)
    if isinstance(public.get("choices"), list):
        choices = []
        for choice in public["choices"]:
            choice = _pick(choice, CHOICE_FIELDS)
            for part in ("message", "delta"):
                if isinstance(choice, dict) and part in choice:
                    choice[part] = _pick(choice[part], MESSAGE_FIELDS)
            choices.append(choice)
        public["choices"] = choices
    if "usage" in public:
        public["usage"] = _pick(public["usage"], USAGE_FIELDS)
    return public


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def sse(events: AsyncIterator[StreamEvent], routed: Routed) -> AsyncIterator[bytes]:
    """The service's stream events as SSE. The `router` object rides on the first chunk and, with the
    cost, on the usage chunk at the end; a mid-stream failure is an `error` event."""
    first = True
    async with contextlib.aclosing(events) as stream:
        async for event in stream:
            if event is None:
                yield b"data: [DONE]\n\n"
            elif isinstance(event, StreamError):
                kind = "backend_error" if event.retryable else "upstream_invalid_request"
                error = {"message": event.message, "type": kind, "code": kind}
                yield b"event: error\n" + _data({"error": error})
            else:
                event = openai_completion(event)
                if first or event.get("usage"):
                    event["router"] = router_info(routed).model_dump(mode="json")
                    first = False
                yield _data(event)
