"""What goes on the wire from a service result: the `router` object and SSE framing."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from router.api.protocol import RouterInfo
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
    )


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
                error = {"message": event.message, "type": kind, "code": 502 if event.retryable else event.status}
                yield b"event: error\n" + _data({"error": error})
            else:
                if first or event.get("usage"):
                    event["router"] = router_info(routed).model_dump(mode="json")
                    first = False
                yield _data(event)
