"""One error model for the whole API: an HTTP status, a machine-readable type and code, and a clear message.

As in OpenAI's errors, `type` is the kind of error and `code` a string naming the case (None: the type
says it all, and the API then sends the type as the code).
"""

from __future__ import annotations


class RouterError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = {}
        if code is not None:
            self.code = code


class BadRequest(RouterError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(RouterError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message, code)
        self.headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(RouterError):
    status = 403
    type = "permission_denied"


class TooManyRequests(RouterError):
    """A rate limit or a spending budget; Retry-After says when trying again can succeed."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int | None = None, type_: str | None = None) -> None:
        super().__init__(message, type_)
        if type_:
            self.type = type_
        if retry_after_s is not None:
            self.headers = {"Retry-After": str(retry_after_s)}


class NotFound(RouterError):
    status = 404
    type = "not_found"


class PayloadTooLarge(RouterError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(RouterError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


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


class DatabaseUnavailable(RouterError):
    """The database cannot be reached (an outage, a restart): 503 with Retry-After; nothing was recorded."""

    status = 503
    type = "database_unavailable"

    def __init__(self, message: str, retry_after_s: int = 2) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class UpstreamClientError(RouterError):
    """The backend rejected the request as the client's fault (e.g. too many tokens); status passes through."""

    type = "upstream_invalid_request"

    def __init__(self, message: str, status: int, code: str | None = None) -> None:
        super().__init__(message, code)
        self.status = status
