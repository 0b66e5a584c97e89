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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

VLLM_QUEUE_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    base_url: str
    model: str
    price_per_1m_input_tokens_usd: float
    price_per_1m_output_tokens_usd: float
    max_concurrent_requests: int = 16
    timeout_s: float = 120.0

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.price_per_1m_input_tokens_usd
            + completion_tokens * self.price_per_1m_output_tokens_usd
        ) / 1e6


class BackendError(Exception):
    """A failed upstream call. `retryable` says whether another backend may take the request."""

    def __init__(self, backend: str, message: str, *, status: int, retryable: bool) -> None:
        super().__init__(f"backend {backend}: {message}")
        self.backend = backend
        self.status = status
        self.retryable = retryable


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


def _upstream_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)[:500]
    return str(error)[:500]


class BackendClient:
    def __init__(self, spec: BackendSpec, http: httpx.AsyncClient) -> None:
        self.spec = spec
        self._http = http
        self._slots = asyncio.Semaphore(spec.max_concurrent_requests)
        self.in_flight = 0

    def _request_body(self, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        upstream = {**body, "model": self.spec.model, "stream": stream}
        if stream:
            upstream["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return upstream

    def _failure(self, exc: Exception) -> BackendError:
        if isinstance(exc, httpx.TimeoutException):
            return BackendError(self.spec.name, f"timed out after {self.spec.timeout_s:g}s", status=504, retryable=True)
        return BackendError(self.spec.name, f"unreachable ({type(exc).__name__}: {exc})", status=502, retryable=True)

    def _status_failure(self, response: httpx.Response) -> BackendError:
        message = f"HTTP {response.status_code}: {_upstream_message(response)}"
        if response.status_code >= 500:
            return BackendError(self.spec.name, message, status=502, retryable=True)
        status = response.status_code if response.status_code in (400, 404, 413, 422, 429) else 400
        return BackendError(self.spec.name, message, status=status, retryable=False)

    async def chat(self, body: dict[str, Any]) -> ChatResult:
        async with self._slots:
            self.in_flight += 1
            started = time.perf_counter()
            try:
                response = await self._http.post(
                    f"{self.spec.base_url}/v1/chat/completions",
                    json=self._request_body(body, stream=False),
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
                    raise BackendError(self.spec.name, f"stream error: {error.get('message', error)}", status=status,
                                       retryable=not 400 <= status < 500)
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
        """`/health` must answer 200 and `/v1/models` must list our model; `/metrics` is best effort."""
        base = self.spec.base_url
        try:
            health = await self._http.get(f"{base}/health", timeout=timeout_s)
            if health.status_code != 200:
                return HealthReport(False, f"/health answered HTTP {health.status_code}")
            models_response = await self._http.get(f"{base}/v1/models", timeout=timeout_s)
            models = [m.get("id") for m in models_response.json().get("data", [])] if models_response.status_code == 200 else []
        except (httpx.HTTPError, ValueError) as exc:
            return HealthReport(False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if self.spec.model not in models:
            return HealthReport(False, f"model {self.spec.model!r} not served (serves {models})", models)
        queue: dict[str, float] = {}
        try:
            metrics = await self._http.get(f"{base}/metrics", timeout=timeout_s)
            if metrics.status_code == 200:
                queue = parse_prometheus(metrics.text)
        except httpx.HTTPError:
            pass
        return HealthReport(True, None, models, queue)
