"""The HTTP layer: handlers, request limits, SSE framing, the response's `router` object, protocol
models and the error model, over `router.service`."""

from router.api.app import create_app

__all__ = ["create_app"]
