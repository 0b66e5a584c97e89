"""Async client for one OpenAI-compatible LLM server (vLLM): chat, streaming, cost, health, metrics.

Knows nothing of policies or HTTP handlers: it sends a chat request upstream, measures it, turns the
usage tokens into USD from the backend's prices, and classifies failures so the caller can decide
whether another backend may retry (connection errors, timeouts, 5xx) or the client was wrong (4xx).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

VLLM_QUEUE_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")

# A request body key the router sets (never sent upstream): the body's `max_tokens` is the router's default
# (the client asked none), so each backend lowers it to what fits its context.
FIT_MAX_TOKENS = "_router_fit_max_tokens"
CONTEXT_MARGIN_TOKENS = 4  # per message: the chat template's role markers, on top of the text's estimate


def message_text(message: dict[str, Any]) -> str:
    """A chat message's text: the string content, or its text parts joined by spaces."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text")
    return ""


def estimate_tokens(text: str) -> int:
    """Rough token count (characters / 4): prices a prompt and checks it against a backend's context."""
    return max(1, len(text) // 4)


def prompt_tokens_estimate(messages: list[dict[str, Any]]) -> int:
    """The prompt's estimated tokens: every message's text, one per line, at characters / 4."""
    return estimate_tokens("\n".join(message_text(m) for m in messages if message_text(m)))


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    base_url: str
    model: str
    price_per_1m_input_tokens_usd: float
    price_per_1m_output_tokens_usd: float
    max_concurrent_requests: int = 16
    timeout_s: float = 120.0
    # Sent with every request (chat, stream, health, models, metrics): a hosted endpoint's
    # `Authorization: Bearer <key>` and the config's extra headers. Never shown: it may hold the key.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.price_per_1m_input_tokens_usd
            + completion_tokens * self.price_per_1m_output_tokens_usd
        ) / 1e6


class BackendError(Exception):
    """A failed upstream call. `retryable` says whether another backend may take the request;
    `upstream_message` is what the backend itself said, when it said something."""

    def __init__(self, backend: str, message: str, *, status: int, retryable: bool, upstream_message: str | None = None) -> None:
        super().__init__(f"backend {backend}: {message}")
        self.backend = backend
        self.status = status
        self.retryable = retryable
        self.upstream_message = upstream_message

    @property
    def client_fault(self) -> bool:
        """The backend answered that the request was wrong (400, 413, 422): not the backend's failure."""
        return not self.retryable and 400 <= self.status < 500


@dataclass(slots=True)
class ChatResult:
    body: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_ms: float


@dataclass(slots=True)
class StreamUsage:
    """Filled in while a stream is consumed; final once the iterator is exhausted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    completed: bool = False


@dataclass(slots=True)
class HealthReport:
    healthy: bool
    error: str | None = None
    models: list[str] = field(default_factory=list)
    queue: dict[str, float] = field(default_factory=dict)
    max_model_len: int | None = None  # the served model's context length, when `/v1/models` says it (vLLM does)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str, names: tuple[str, ...] = VLLM_QUEUE_METRICS) -> dict[str, float]:
    """Sum the samples of each named metric over its label sets (one engine per model in vLLM)."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) not in names:
            continue
        try:
            totals[match.group(1)] = totals.get(match.group(1), 0.0) + float(match.group(2))
        except ValueError:
            continue
    return totals


def _usage(body: dict[str, Any]) -> tuple[int, int]:
    usage = body.get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _readable(detail: Any) -> str:
    """An upstream error's message as text: a string as it is; a validation list (FastAPI, pydantic) as
    `field: message; ...`; never a Python repr of a dict."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, dict):
        for key in ("message", "msg", "detail", "error"):
            if detail.get(key):
                text = _readable(detail[key])
                location = detail.get("loc")
                if key == "msg" and isinstance(location, list | tuple):
                    where = ".".join(str(p) for p in location if p not in ("body",))
                    return f"{where}: {text}" if where else text
                return text
        return json.dumps(detail, separators=(", ", ": "), default=str)
    if isinstance(detail, list):
        return "; ".join(_readable(item) for item in detail)
    return str(detail)


def _upstream_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    return _readable(payload)[:500] or response.reason_phrase


class BackendClient:
    def __init__(self, spec: BackendSpec, http: httpx.AsyncClient) -> None:
        self.spec = spec
        self._http = http
        self._slots = asyncio.Semaphore(spec.max_concurrent_requests)
        self.in_flight = 0
        self.max_model_len: int | None = None  # learned from the health check's `/v1/models`

    def fit_max_tokens(self, body: dict[str, Any]) -> int | None:
        """The `max_tokens` this backend gets for a router-set default: what fits its context beside the
        prompt (estimated), never above the default; None when the body's limit is the client's own."""
        if not body.get(FIT_MAX_TOKENS) or body.get("max_tokens") is None:
            return None
        if self.max_model_len is None:
            return int(body["max_tokens"])
        messages = body.get("messages") or []
        prompt = prompt_tokens_estimate(messages) + CONTEXT_MARGIN_TOKENS * len(messages)
        return max(1, min(int(body["max_tokens"]), self.max_model_len - prompt))

    def _request_body(self, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        upstream = {**body, "model": self.spec.model, "stream": stream}
        fitted = self.fit_max_tokens(body)
        upstream.pop(FIT_MAX_TOKENS, None)
        if fitted is not None:
            upstream["max_tokens"] = fitted
        if stream:
            upstream["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return upstream

    def _failure(self, exc: Exception) -> BackendError:
        if isinstance(exc, httpx.TimeoutException):
            return BackendError(self.spec.name, f"timed out after {self.spec.timeout_s:g}s", status=504, retryable=True)
        return BackendError(self.spec.name, f"unreachable ({type(exc).__name__}: {exc})", status=502, retryable=True)

    def _status_failure(self, response: httpx.Response) -> BackendError:
        """400, 413 and 422 say the request was wrong: the client's fault, passed through, never retried.
        Any other status (5xx, and 401/403/404/429: a key, a model name or a quota of the router's own
        configuration) is the backend's failure: another backend may take the request."""
        upstream = _upstream_message(response)
        message = f"HTTP {response.status_code}: {upstream}"
        if response.status_code in (400, 413, 422):
            status = 413 if response.status_code == 413 else 400
            return BackendError(self.spec.name, message, status=status, retryable=False, upstream_message=upstream)
        return BackendError(self.spec.name, message, status=502, retryable=True, upstream_message=upstream)

    async def chat(self, body: dict[str, Any]) -> ChatResult:
        async with self._slots:
            self.in_flight += 1
            started = time.perf_counter()
            try:
                response = await self._http.post(
                    f"{self.spec.base_url}/v1/chat/completions",
                    json=self._request_body(body, stream=False),
                    headers=self.spec.headers,
                    timeout=self.spec.timeout_s,
                )
            except httpx.HTTPError as exc:
                raise self._failure(exc) from exc
            finally:
                self.in_flight -= 1
        latency_ms = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise self._status_failure(response)
        try:
            payload = response.json()
        except ValueError as exc:
            raise BackendError(self.spec.name, "answered with invalid JSON", status=502, retryable=True) from exc
        prompt_tokens, completion_tokens = _usage(payload)
        return ChatResult(
            body=payload,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=self.spec.cost_usd(prompt_tokens, completion_tokens),
            latency_ms=latency_ms,
        )

    async def open_stream(self, body: dict[str, Any]) -> tuple[AsyncIterator[dict[str, Any] | None], StreamUsage]:
        """Start a streamed chat; failures before the first byte raise here, so the caller can fail over.

        The iterator yields each upstream SSE `data:` payload as a dict, then None for `[DONE]`.
        """
        await self._slots.acquire()
        self.in_flight += 1
        started = time.perf_counter()
        request = self._http.build_request(
            "POST",
            f"{self.spec.base_url}/v1/chat/completions",
            json=self._request_body(body, stream=True),
            headers=self.spec.headers,
            timeout=self.spec.timeout_s,
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            self._release()
            raise self._failure(exc) from exc
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            self._release()
            raise self._status_failure(response)
        usage = StreamUsage()
        return self._events(response, usage, started), usage

    def _release(self) -> None:
        self.in_flight -= 1
        self._slots.release()

    async def _events(
        self, response: httpx.Response, usage: StreamUsage, started: float
    ) -> AsyncIterator[dict[str, Any] | None]:
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    usage.completed = True
                    yield None
                    return
                try:
                    event = json.loads(data)
                except ValueError as exc:
                    raise BackendError(self.spec.name, "sent an invalid stream event", status=502, retryable=False) from exc
                if isinstance(event.get("error"), dict):  # vLLM rejects some requests inside a 200 stream
                    error = event["error"]
                    status = error.get("code") if isinstance(error.get("code"), int) else 502
                    text = _readable(error)
                    raise BackendError(self.spec.name, f"stream error: {text}", status=status,
                                       retryable=not 400 <= status < 500, upstream_message=text)
                if event.get("usage"):
                    usage.prompt_tokens, usage.completion_tokens = _usage(event)
                    usage.cost_usd = self.spec.cost_usd(usage.prompt_tokens, usage.completion_tokens)
                yield event
            raise BackendError(self.spec.name, "stream ended before [DONE] (connection closed)", status=502, retryable=True)
        except httpx.HTTPError as exc:
            raise self._failure(exc) from exc
        finally:
            usage.latency_ms = (time.perf_counter() - started) * 1000
            await response.aclose()
            self._release()

    async def health(self, timeout_s: float) -> HealthReport:
        """`/health` must answer 200 and `/v1/models` must list our model; `/metrics` is best effort. A
        server without `/health` (404: hosted OpenAI-compatible APIs) is judged by `/v1/models` alone."""
        base, headers = self.spec.base_url, self.spec.headers
        try:
            health = await self._http.get(f"{base}/health", headers=headers, timeout=timeout_s)
            if health.status_code not in (200, 404):
                return HealthReport(False, f"/health answered HTTP {health.status_code}")
            models_response = await self._http.get(f"{base}/v1/models", headers=headers, timeout=timeout_s)
            if models_response.status_code != 200:  # 401/403: a wrong or missing api_key_env
                return HealthReport(False, f"/v1/models answered HTTP {models_response.status_code}")
            cards = models_response.json().get("data", [])
            cards = [c for c in cards if isinstance(c, dict)]
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            return HealthReport(False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        models = [c.get("id") for c in cards]
        if self.spec.model not in models:
            return HealthReport(False, f"model {self.spec.model!r} not served (serves {models})", models)
        card = next(c for c in cards if c.get("id") == self.spec.model)
        context = card.get("max_model_len")
        max_model_len = context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else None
        queue: dict[str, float] = {}
        try:
            metrics = await self._http.get(f"{base}/metrics", headers=headers, timeout=timeout_s)
            if metrics.status_code == 200:
                queue = parse_prometheus(metrics.text)
        except httpx.HTTPError:
            pass
        return HealthReport(True, None, models, queue, max_model_len)
