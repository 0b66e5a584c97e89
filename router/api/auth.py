"""Who is calling, what they may do, and how fast they may call.

Keys live only as SHA-256 hashes. Rate limits are token buckets per key: in memory for one process;
several replicas (`cluster.enabled`) share one bucket per key in the database (`shared_buckets`, taken
in `admit`), so the limit holds across replicas. How much a key may spend is money, and lives in
`router.budget`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from router.config import ApiKeyConfig, AuthConfig, ConfigError
from router.errors import Forbidden, TooManyRequests, Unauthorized

Role = Literal["client", "admin"]
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Principal:
    """The caller of one request. `tenant` is None for the open (no key) demo mode."""

    name: str
    role: Role
    tenant: str | None

    def require(self, role: Role) -> None:
        if role == "admin" and self.role != "admin":
            raise Forbidden(f"key {self.name!r} has role {self.role!r}; this endpoint needs role 'admin'")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Bucket:
    capacity: float
    per_second: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take one token; returns 0 on success, else the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.per_second)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.per_second


class Authenticator:
    """Resolves `Authorization: Bearer <key>` to a Principal and applies the key's rate limit."""

    def __init__(self, config: AuthConfig, host: str, environ: Mapping[str, str], clock: Callable[[], float] = time.monotonic) -> None:
        self.open = config.open_on_loopback
        if self.open and not is_loopback(host):
            raise ConfigError(f"auth.open_on_loopback needs a loopback server address, not {host!r}; configure [[auth.keys]]")
        if not self.open and not config.keys:
            raise ConfigError("auth: no [[auth.keys]] configured; add keys, or set auth.open_on_loopback for a loopback demo")
        self.keys: dict[str, ApiKeyConfig] = {}
        for key in config.keys:
            if key.key_env is not None:
                raw = environ.get(key.key_env)
                if not raw:
                    raise ConfigError(f"auth.keys {key.name!r}: environment variable {key.key_env} is not set")
                self.keys[hash_key(raw)] = key
            else:
                self.keys[(key.key_sha256 or "").lower()] = key
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        # Several replicas: (key name, capacity, tokens per second) -> seconds to wait (0: taken), in the database.
        self.shared_buckets: Callable[[str, float, float], Awaitable[float]] | None = None
        self._by_name = {key.name: key for key in self.keys.values()}

    def authenticate(self, authorization: str | None) -> Principal:
        """In open mode a configured key still names its tenant; no key, or any other key (OpenAI clients
        insist on sending one), is the anonymous admin."""
        key = self._match(authorization)
        if key is None:
            if self.open:
                return Principal(ANONYMOUS, "admin", None)
            if not authorization:
                raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
            raise Unauthorized("invalid API key")
        if self.shared_buckets is None:
            self._rate_limit(key)
        return Principal(key.name, key.role, key.name)

    async def admit(self, principal: Principal) -> None:
        """Several replicas: the key's rate limit, from its bucket in the database (one process: nothing
        to do here, `authenticate` applied it)."""
        key = self._by_name.get(principal.name) if principal.tenant is not None else None
        if self.shared_buckets is None or key is None or not key.requests_per_minute:
            return
        capacity = float(key.burst or max(1.0, key.requests_per_minute))
        wait = await self.shared_buckets(key.name, capacity, key.requests_per_minute / 60)
        if wait:
            raise self._limited(key, wait)

    def _match(self, authorization: str | None) -> ApiKeyConfig | None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hash_key(token.strip())
        return next((k for h, k in self.keys.items() if hmac.compare_digest(h, digest)), None)

    def _rate_limit(self, key: ApiKeyConfig) -> None:
        if not key.requests_per_minute:
            return
        now = self._clock()
        bucket = self._buckets.get(key.name)
        if bucket is None:
            capacity = float(key.burst or max(1.0, key.requests_per_minute))
            bucket = self._buckets[key.name] = _Bucket(capacity, key.requests_per_minute / 60, capacity, now)
        wait = bucket.take(now)
        if wait:
            raise self._limited(key, wait)

    @staticmethod
    def _limited(key: ApiKeyConfig, wait: float) -> TooManyRequests:
        return TooManyRequests(
            f"rate limit of key {key.name!r} reached ({key.requests_per_minute:g} requests per minute)",
            retry_after_s=math.ceil(wait),
        )


def caller_of(connection: Any) -> Principal:
    """Who sent the request, as the guard authenticated it (`connection.state.caller`). Handlers read it
    here rather than as a second dependency: litestar resolves two dependencies of one handler in an anyio
    task group on every request (8% of the event loop's time under reward load, py-spy)."""
    return connection.state.caller
