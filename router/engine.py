"""The routing engine: the one object that owns the request path (embed, recall, decide, call, log).

The HTTP handlers and the offline replay both drive this class, so what is measured offline is what
runs in the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.client import BackendError, BackendSpec
from backends.pool import BackendPool
from policies import Arm, Choice, Context, Feedback, Policy, PolicyError, registry
from router.config import BackendConfig, RouterConfig
from router.db import create_db_engine, migrate
from router.embedding import Embedder
from router.errors import BadGateway, BadRequest, Conflict, GatewayTimeout, NotFound, ServiceUnavailable, UpstreamClientError
from router.memory import Memory
from router.metrics import RouterMetrics
from router.protocol import ChatCompletionRequest, RewardRequest, RewardResponse, RouterInfo, RouterOptions
from router.store import Store
from router.tables import Decision, QueryEmbedding

log = logging.getLogger("llm_router")

PINNED = "pinned"


def backend_spec(config: BackendConfig) -> BackendSpec:
    return BackendSpec(
        name=config.name,
        base_url=config.base_url,
        model=config.model,
        price_per_1m_input_tokens_usd=config.price_per_1m_input_tokens_usd,
        price_per_1m_output_tokens_usd=config.price_per_1m_output_tokens_usd,
        max_concurrent_requests=config.max_concurrent_requests,
        timeout_s=config.timeout_s,
    )


def estimate_tokens(text: str) -> int:
    """Rough token count (characters / 4), the same rule as the replay data; good enough to price a prompt."""
    return max(1, len(text) // 4)


@dataclass
class Routed:
    """A decision made and logged, with the backends to try in order (the choice, then fallbacks)."""

    info: RouterInfo
    order: list[str]
    pinned: bool
    started: float = field(default_factory=time.perf_counter)


class RoutingEngine:
    def __init__(self, config: RouterConfig, embedder: Embedder | None = None) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.embedder = embedder or Embedder(config.embedder.path)
        self.db = create_db_engine(config.database_url)
        if config.auto_migrate:
            migrate(self.db)
        self.store = Store(self.db)
        self.pool = BackendPool([backend_spec(b) for b in config.backends])
        self.policies: dict[str, Policy] = {
            name: registry.create(name, seed=config.seed, **config.policy_options.get(name, {}))
            for name in config.policy_names
        }
        self.active_policy = config.default_policy
        self.memory = Memory(self.embedder.dim)
        self._output_tokens: dict[str, tuple[int, float]] = {}
        self._embed_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._background: set[asyncio.Task[Any]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._load_memory()
        self._teach_from_log()

    # -- start-up -------------------------------------------------------------------------------

    def _load_memory(self) -> None:
        for rows in self.store.memory_rows(self.embedder.name):
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            vectors = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
            self.memory.add(ids, vectors, [(r[2], r[3], r[4]) for r in rows])
        self.metrics.memory_size.set(len(self.memory))

    def _teach_from_log(self) -> None:
        """Replay every acknowledged reward into the policies, in order, so learning survives restarts."""
        for stored in self.store.feedback_since(0):
            decision = stored.decision
            if decision.completion_tokens is not None:
                self._observe_output(decision.backend, decision.completion_tokens)
            if stored.vector is None:
                continue
            self._learn(decision, stored.vector, stored.reward)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.check_backends()
        self._health_task = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.pool.close()
        self._embed_executor.shutdown(wait=False)
        self.db.dispose()

    async def check_backends(self) -> None:
        await self.pool.check_all(self.config.health.timeout_s)
        for name in self.pool.names():
            self.metrics.backend_up.labels(name).set(1 if self.pool.state(name).healthy else 0)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health.interval_s)
            try:
                await self.check_backends()
            except Exception:  # a failed round must not stop later ones
                log.exception("backend health check failed")

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- deciding ---------------------------------------------------------------------------------

    async def embed(self, text: str) -> np.ndarray:
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._embed_executor, self.embedder.embed, [text])
        return vectors[0]

    def _expected_output_tokens(self, backend: str, limit: int | None) -> int:
        count, mean = self._output_tokens.get(backend, (0, 0.0))
        expected = int(round(mean)) if count else self.config.budget.default_output_tokens
        return min(expected, limit) if limit else expected

    def _observe_output(self, backend: str, completion_tokens: int) -> None:
        count, mean = self._output_tokens.get(backend, (0, 0.0))
        count += 1
        self._output_tokens[backend] = (count, mean + (completion_tokens - mean) / count)

    def _arms(self, names: list[str], prompt_tokens: int, limit: int | None) -> list[Arm]:
        arms = []
        for name in names:
            spec = self.pool.state(name).spec
            predicted = spec.cost_usd(prompt_tokens, self._expected_output_tokens(name, limit))
            arms.append(Arm(name, spec.price_per_1m_input_tokens_usd, spec.price_per_1m_output_tokens_usd, predicted))
        return arms

    def _policy(self, options: RouterOptions) -> tuple[str, Policy]:
        name = options.policy or self.active_policy
        if name not in self.policies:
            raise BadRequest(f"unknown policy {name!r}; this router runs {sorted(self.policies)}")
        return name, self.policies[name]

    async def decide(self, request: ChatCompletionRequest, kind: str) -> Routed:
        started = time.perf_counter()
        options = request.router or RouterOptions()
        policy_name, policy = self._policy(options)
        pinned = request.model != "auto"
        if pinned and request.model not in self.pool:
            raise NotFound(f"unknown backend {request.model!r}; use \"auto\" or one of {self.pool.names()}")
        names = [request.model] if pinned else [s.spec.name for s in self.pool.eligible()]
        if not names:
            raise ServiceUnavailable("no healthy backend: every backend failed its last health check")

        vector = await self.embed(request.query_text())
        prompt_tokens = estimate_tokens(request.prompt_text())
        arms = self._arms(names, prompt_tokens, request.output_token_limit())
        cap = options.max_cost_usd if options.max_cost_usd is not None else (self.config.budget.default_max_cost_usd or None)
        affordable = [a for a in arms if cap is None or a.predicted_cost_usd <= cap]
        over_budget = cap is not None and not affordable
        candidates = affordable or [min(arms, key=lambda a: a.predicted_cost_usd)]
        context = Context(
            embedding=vector,
            prompt_tokens=prompt_tokens,
            arms=tuple(candidates),
            neighbours=self.memory.search(vector, self.config.embedder.neighbours),
        )
        if pinned:
            choice = Choice(arm=request.model, probabilities={request.model: 1.0}, scores={})
            policy_name = PINNED
        else:
            choice = policy.choose(context)
        chosen = next(a for a in candidates if a.name == choice.arm)
        fallbacks = sorted((a for a in candidates if a.name != choice.arm), key=lambda a: -choice.scores.get(a.name, 0.0))

        decision_id = "dec_" + uuid.uuid4().hex
        memory_id = uuid.uuid4().int >> 65  # 63 bits: a positive int64 id for FAISS
        decision_ms = (time.perf_counter() - started) * 1000
        decision = Decision(
            id=decision_id,
            kind=kind,
            requested_model=request.model,
            query=request.query_text(),
            prompt_tokens_estimate=prompt_tokens,
            embedding_id=memory_id,
            policy=policy_name,
            backend=choice.arm,
            propensity=choice.propensity,
            scores=choice.scores,
            candidates=[
                {"name": a.name, "in": a.price_per_1m_input_tokens_usd, "out": a.price_per_1m_output_tokens_usd,
                 "predicted_cost_usd": a.predicted_cost_usd}
                for a in candidates
            ],
            predicted_cost_usd=chosen.predicted_cost_usd,
            max_cost_usd=cap,
            over_budget=over_budget,
            decision_ms=decision_ms,
        )
        embedding = QueryEmbedding(id=memory_id, embedder=self.embedder.name, dim=self.embedder.dim, vector=vector.tobytes())
        await asyncio.to_thread(self.store.insert_decision, decision, embedding)
        self.memory.add(np.array([memory_id], dtype=np.int64), vector.reshape(1, -1), [(decision_id, choice.arm, None)])
        self.metrics.memory_size.set(len(self.memory))
        self.metrics.decisions.labels(policy_name, choice.arm, kind).inc()
        self.metrics.decision_seconds.observe((time.perf_counter() - started))
        info = RouterInfo(
            decision_id=decision_id,
            backend=choice.arm,
            policy=policy_name,
            propensity=choice.propensity,
            predicted_cost_usd=chosen.predicted_cost_usd,
            max_cost_usd=cap,
            over_budget=over_budget,
            scores=choice.scores,
        )
        return Routed(info=info, order=[choice.arm, *(a.name for a in fallbacks)], pinned=pinned)

    async def route(self, request: ChatCompletionRequest) -> RouterInfo:
        return (await self.decide(request, "route")).info

    # -- generating -------------------------------------------------------------------------------

    def _on_backend_failure(self, routed: Routed, error: BackendError) -> None:
        self.metrics.requests.labels(error.backend, "error").inc()
        routed.info.failed_backends.append(error.backend)
        if error.retryable:
            self.pool.mark_failed(error.backend, str(error))
        log.warning("decision %s: %s", routed.info.decision_id, error)

    def _terminal_error(self, routed: Routed, error: BackendError | None) -> Exception:
        if error is not None and not error.retryable:
            return UpstreamClientError(str(error), error.status)
        detail = f"; last error: {error}" if error else ""
        if error is not None and error.status == 504 and len(routed.order) == 1:
            return GatewayTimeout(f"backend {error.backend} timed out{detail}")
        if routed.pinned:
            return BadGateway(f"backend {routed.order[0]} failed{detail}")
        return ServiceUnavailable(f"every candidate backend failed ({', '.join(routed.info.failed_backends)}){detail}")

    async def _finish(self, routed: Routed, **fields: Any) -> None:
        fields["failed_backends"] = list(routed.info.failed_backends)
        await asyncio.to_thread(self.store.finish_decision, routed.info.decision_id, **fields)

    def _record_answer(self, backend: str, completion_tokens: int, cost_usd: float, latency_ms: float) -> None:
        self._observe_output(backend, completion_tokens)
        self.metrics.requests.labels(backend, "ok").inc()
        self.metrics.cost.labels(backend).inc(cost_usd)
        self.metrics.backend_seconds.labels(backend).observe(latency_ms / 1000)

    def _switch_backend(self, routed: Routed, backend: str) -> None:
        if backend != routed.info.backend:
            routed.info.backend = backend
            self.memory.set_backend(routed.info.decision_id, backend)

    async def chat(self, request: ChatCompletionRequest) -> tuple[dict[str, Any], RouterInfo]:
        routed = await self.decide(request, "chat")
        body = request.upstream_body()
        last_error: BackendError | None = None
        for backend in routed.order:
            try:
                result = await self.pool.state(backend).client.chat(body)
            except BackendError as error:
                last_error = error
                self._on_backend_failure(routed, error)
                if error.retryable and not routed.pinned:
                    continue
                break
            self._switch_backend(routed, backend)
            routed.info.cost_usd = result.cost_usd
            self._record_answer(backend, result.completion_tokens, result.cost_usd, result.latency_ms)
            await self._finish(
                routed, status="ok", backend=backend, prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens, cost_usd=result.cost_usd, latency_ms=result.latency_ms,
            )
            response = result.body
            response["router"] = routed.info.model_dump(mode="json")
            return response, routed.info
        await self._finish(routed, status="error", error=str(last_error))
        raise self._terminal_error(routed, last_error)

    async def chat_stream(self, request: ChatCompletionRequest) -> tuple[AsyncIterator[bytes], RouterInfo]:
        """Open the upstream stream (failing over before the first byte), then relay its SSE events.

        The `router` object rides on the first chunk and, with the cost, on the usage chunk at the end.
        A failure in mid-stream reaches the client as an SSE `error` event, never as a hang.
        """
        routed = await self.decide(request, "chat")
        body = request.upstream_body()
        last_error: BackendError | None = None
        for backend in routed.order:
            try:
                events, usage = await self.pool.state(backend).client.open_stream(body)
            except BackendError as error:
                last_error = error
                self._on_backend_failure(routed, error)
                if error.retryable and not routed.pinned:
                    continue
                break
            self._switch_backend(routed, backend)
            return self._relay(routed, backend, events, usage), routed.info
        await self._finish(routed, status="error", error=str(last_error))
        raise self._terminal_error(routed, last_error)

    async def _relay(self, routed: Routed, backend: str, events: AsyncIterator[dict[str, Any] | None], usage: Any) -> AsyncIterator[bytes]:
        first = True
        error: str | None = None
        try:
            async with contextlib.aclosing(events) as upstream:  # frees the backend slot if the client leaves
                async for event in upstream:
                    if event is None:
                        yield b"data: [DONE]\n\n"
                        continue
                    if event.get("usage"):
                        routed.info.cost_usd = usage.cost_usd
                    if first or event.get("usage"):
                        event["router"] = routed.info.model_dump(mode="json")
                        first = False
                    yield b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
        except BackendError as exc:
            error = str(exc)
            self._on_backend_failure(routed, exc)
            payload = {"error": {"message": error, "type": "backend_error", "code": 502}}
            yield b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
        finally:
            if usage.completed and error is None:
                self._record_answer(backend, usage.completion_tokens, usage.cost_usd, usage.latency_ms)
                fields = dict(status="ok", prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                              cost_usd=usage.cost_usd, latency_ms=usage.latency_ms)
            else:
                fields = dict(status="error", error=error or "stream ended early (client gone or backend closed)",
                              cost_usd=usage.cost_usd or None, latency_ms=usage.latency_ms)
            self._spawn(self._finish(routed, backend=backend, **fields))

    # -- feedback ---------------------------------------------------------------------------------

    def _learn(self, decision: Decision, vector: np.ndarray, reward: float) -> None:
        arms = tuple(Arm(c["name"], c["in"], c["out"], c["predicted_cost_usd"]) for c in decision.candidates)
        feedback = Feedback(
            context=Context(embedding=vector, prompt_tokens=decision.prompt_tokens_estimate, arms=arms),
            arm=decision.backend,
            reward=reward,
            propensity=decision.propensity,
            cost_usd=decision.cost_usd or 0.0,
            latency_ms=decision.latency_ms or 0.0,
        )
        for policy in self.policies.values():
            policy.learn(feedback)

    async def feedback(self, request: RewardRequest) -> RewardResponse:
        decision, vector = await asyncio.to_thread(self.store.decision_with_vector, request.decision_id)
        if decision.status == "error":
            raise Conflict(f"decision {decision.id} produced no answer ({decision.error}); nothing to reward")
        if request.reward is None:
            unknown = [b for b in (request.winner, request.loser) if b not in self.pool]
            if unknown:
                raise BadRequest(f"unknown backends {unknown} in preference; known: {self.pool.names()}")
            duplicate = await asyncio.to_thread(self.store.record_preference, decision.id, request.winner, request.loser)
            self.metrics.rewards.labels("preference").inc()
            return RewardResponse(decision_id=decision.id, kind="preference", duplicate=duplicate)
        _, duplicate = await asyncio.to_thread(self.store.record_reward, decision.id, request.reward)
        if not duplicate:
            self.memory.set_reward(decision.id, request.reward)
            if vector is not None:
                try:
                    self._learn(decision, vector, request.reward)
                except PolicyError as exc:  # stored already; a policy that cannot use it must not fail the call
                    log.warning("decision %s: policy could not learn: %s", decision.id, exc)
            self.metrics.rewards.labels("reward").inc()
        return RewardResponse(decision_id=decision.id, kind="reward", duplicate=duplicate)

    # -- inspection -------------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        summary = await asyncio.to_thread(self.store.summary)
        policies = {}
        for name, policy in self.policies.items():
            policies[name] = {**policy.stats(), "decisions": summary["policies"].get(name, {})}
        return {
            "active_policy": self.active_policy,
            "policies": policies,
            "pinned": summary["policies"].get(PINNED, {}),
            "backends": summary["backends"],
            "memory_queries": len(self.memory),
            "expected_output_tokens": {b: round(m, 1) for b, (_, m) in self._output_tokens.items()},
        }
