"""The HTTP layer: handlers, request limits, SSE framing, the response's `router` object, protocol
models and the error model, over `router.service`.

`create_app` is imported on first use, so `router.api.auth` (needed by `llm-router config check` and
by `serve` before anything starts) loads without the service and its models."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from router.api.app import create_app

        return create_app
    raise AttributeError(f"module 'router.api' has no attribute {name!r}")
