"""One error model for the whole API: an HTTP status, a machine-readable type and a clear message."""

from __future__ import annotations


class RouterError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = {}


class BadRequest(RouterError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(RouterError):
    status = 401
    type = "authentication_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(RouterError):
    status = 403
    type = "permission_denied"


class TooManyRequests(RouterError):
    """A rate limit or a spending budget; Retry-After says when trying again can succeed."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        if type_:
            self.type = type_
        if retry_after_s is not None:
            self.headers = {"Retry-After": str(retry_after_s)}


class NotFound(RouterError):
    status = 404
    type = "not_found"


class Conflict(RouterError):
    status = 409
    type = "conflict"


class BadGateway(RouterError):
    status = 502
    type = "backend_error"


class GatewayTimeout(RouterError):
    status = 504
    type = "backend_timeout"


class ServiceUnavailable(RouterError):
    status = 503
    type = "no_backend_available"


class UpstreamClientError(RouterError):
    """The backend rejected the request as the client's fault (e.g. too many tokens); status passes through."""

    type = "upstream_invalid_request"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
