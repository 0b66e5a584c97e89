"""The routing service: async orchestration around the engine.

It embeds the query, asks the engine to decide, reserves the caller's spend, logs the decision, calls
the backends with failover, records the outcome, learns from feedback, and owns the lifecycle (restart
recovery, health checks, snapshots, the predictor schedule). It takes plain requests and hands back
plain results and stream events: HTTP, SSE framing and the response's `router` object belong to
`router.api`.

One process (the default): learning happens right after each commit, money is held in memory.
Several replicas (`cluster.enabled`, PostgreSQL): every replica applies the shared log in one order
(`router.cluster.LogFollower`; its own writes through the same path, so a reward is answered once this
replica has applied it), money and rate limits are held in the database (`router.store`: spend rows
and holds), and one replica at a time trains or writes a snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import numpy as np

from backends.breaker import BreakerSettings
from backends.client import BackendError, BackendSpec, StreamUsage
from backends.pool import BackendPool, BackendState, FailoverExhausted, Failure
from policies import PREDICTED_POLICIES, Arm, Policy, Predictions
from router.budget import SpendLedger, SpendLimit, SpendRule, pacing_rule, period_start
from router.cluster import Listener, LogFollower, advisory_lease, notify, psycopg_url
from router.config import BackendConfig, RouterConfig
from router.db import create_db_engine, database_error, migrate
from router.embedding import Embedder, TextBatcher, build_embedder
from router.engine import PINNED, DecisionRecord, build_engine
from router.errors import (
    BadGateway,
    BadRequest,
    Conflict,
    DatabaseUnavailable,
    Forbidden,
    GatewayTimeout,
    NotFound,
    ServiceUnavailable,
    UpstreamClientError,
)
from router.memory import Memory, MemoryEntry
from router.metrics import RouterMetrics
from router.modes import ROUTE, VERIFY, Call, Plan, agreement, answer_text
from router.modes import plan as plan_calls
from router.modes import run as run_mode
from router.predicting import PredictorSet
from router.store import (
    Batched,
    Finish,
    GroupWriter,
    Hold,
    HoldRefused,
    LogEvent,
    NewDecision,
    NewFeedback,
    RecordedFeedback,
    Store,
    StoredDecision,
    add_decisions,
    finish_decision,
    log_channel,
    models_channel,
    purge_answers,
    record_feedback,
    release_orphans,
    settle_holds,
    take_holds,
    take_rate_token,
    write_snapshot,
)
from router.timeline import Budgets, KeyBudget, Timeline, build_timeline
from router.training import TrainingScheduler, recent_runs
from router.warm import warm_start

log = logging.getLogger("llm_router")

ROUTER_STATE = "_router"  # snapshot row of the router-level state (pacing, answer lengths, shadow estimates)
T = TypeVar("T")
FEEDBACK_WAIT_S = 60.0  # how long feedback on a decision still being answered waits for its final write
ANSWER_PURGE_EVERY_S = 3600.0
HOLD_ATTEMPTS = 20  # several replicas: a decision whose reservation another replica beat is decided again (fresh room)
DATABASE_PROBE_S = 1.0  # during an outage: how often the database is tried again


def backend_spec(config: BackendConfig) -> BackendSpec:
    """The client's view of a backend; its API key is read from the environment here (ConfigError if missing)."""
    return BackendSpec(
        name=config.name,
        base_url=config.base_url,
        model=config.model,
        price_per_1m_input_tokens_usd=config.price_per_1m_input_tokens_usd,
        price_per_1m_output_tokens_usd=config.price_per_1m_output_tokens_usd,
        max_concurrent_requests=config.max_concurrent_requests,
        timeout_s=config.timeout_s,
        headers=config.request_headers(os.environ),
    )


def estimate_tokens(text: str) -> int:
    """Rough token count (characters / 4), the same rule as the replay data; good enough to price a prompt."""
    return max(1, len(text) // 4)


@dataclass(frozen=True)
class RoutingRequest:
    """What the service needs of a chat request (the API builds it from the OpenAI body)."""

    query: str  # what is embedded: the question being asked
    prompt: str  # every message's text: prices the prompt
    model: str  # "auto" routes; a backend name pins that backend
    output_limit: int  # the most tokens the answer may have (the client's limit, else the router's cap)
    body: dict[str, Any]  # what a backend is sent
    policy: str | None = None
    max_cost_usd: float | None = None
    mode: str | None = None  # None: the config's default mode
    judge: str | None = None  # a cascade's: None, the config's




@dataclass
class Routed:
    """A decision in the service: the engine's record, who asked, and what happened to its calls."""

    record: DecisionRecord
    kind: str  # chat | route
    tenant: str | None
    pinned: bool
    plan: Plan
    failures: list[Failure] = field(default_factory=list)  # each failed or skipped backend, with its reason
    cost_usd: float | None = None  # the answer's real cost (every call's), once known
    calls: list[Call] = field(default_factory=list)  # an answer-aware mode's calls
    rules: list[SpendRule] = field(default_factory=list)  # several replicas: the spend rows its call holds money on

    @property
    def decision_id(self) -> str:
        return self.record.decision_id

    @property
    def order(self) -> list[str]:
        """Where the call goes: the choice, then the fallbacks (a pinned call has no fallback)."""
        return [self.record.chosen] if self.pinned else [self.record.chosen, *self.record.fallbacks]


@dataclass(frozen=True)
class StreamError:
    """A stream failed after its first event: the API ends it with an SSE error event."""

    message: str
    retryable: bool
    status: int


StreamEvent = dict[str, Any] | StreamError | None  # a chunk, a mid-stream error, or None for the end marker


@dataclass(frozen=True)
class FeedbackResult:
    decision_id: str
    kind: str  # reward | preference
    duplicate: bool


class RouterService:
    def __init__(self, config: RouterConfig, embedder: Embedder | None = None) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.embedder = embedder or build_embedder(config.embedder)
        self.db = create_db_engine(config.database_url)
        if config.auto_migrate:
            migrate(self.db)
        self.store = Store(self.db)
        self.writer = GroupWriter(self.db, shared_log=config.cluster.enabled)
        self._record_feedback = functools.partial(record_feedback, refusal=self._feedback_refusal)  # one bulk: batched together
        self._outage: DatabaseUnavailable | None = None  # the database could not be reached, until a probe succeeds
        self.writer.on_outage, self.writer.on_commit = self._database_down, self._database_up
        breaker = config.breaker
        self.pool = BackendPool(
            [backend_spec(b) for b in config.backends],
            breaker=BreakerSettings(breaker.failure_threshold, breaker.open_s, breaker.max_open_s),
        )
        self.engine = build_engine(config, self.embedder.dim)
        self._embed_batcher = TextBatcher(self.embedder.embed)  # concurrent requests share one encode
        self._background: set[asyncio.Task[Any]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._learned = (0, 0)  # highest (reward id, preference id) whose learning is in the policies
        self._since_snapshot = 0
        self._answering: dict[str, asyncio.Future[None]] = {}  # chat decisions whose final write is pending
        self.spend = SpendLedger(config.auth.keys)
        self.predictors = PredictorSet(config.predictors.artifacts_dir, [b.name for b in config.backends], config.policy_names)
        self.predictors.reload()
        # Only when a predictor policy runs: it costs an encoder pass per query.
        self._predicting = bool(set(PREDICTED_POLICIES) & set(config.policy_names))
        self._predict_batcher = TextBatcher(self.predictors.predict, name="predict") if self._predicting else None
        self.training: TrainingScheduler | None = None
        self._probe_task: asyncio.Task[None] | None = None
        # Several replicas: the shared log, money in the database, one trainer (README "Several replicas").
        self.clustered = config.cluster.enabled
        self.replica = (config.cluster.replica_id or f"{socket.gethostname()}:{os.getpid()}") if self.clustered else None
        self._pacing_rule = pacing_rule(self.engine.pacer) if self.clustered else None
        self._live = False  # serving: applied feedback counts toward the next snapshot
        self._interval_start = 0  # several replicas: log position where the current snapshot interval began
        self.follower: LogFollower | None = None
        self._listener: Listener | None = None
        self._cluster_task: asyncio.Task[None] | None = None
        if self.clustered:
            schema = self.store.schema()
            self._log_channel, self._models_channel = log_channel(schema), models_channel(schema)
            self._restore_from_log()
        else:
            self._load_memory()
            self._restore_state()
            self._load_spend()

    @property
    def policies(self) -> dict[str, Policy]:
        return self.engine.policies

    @property
    def memory(self) -> Memory:
        return self.engine.memory

    @property
    def active_policy(self) -> str:
        return self.engine.active

    def set_active_policy(self, name: str) -> None:
        if name not in self.engine.policies:
            raise BadRequest(f"unknown policy {name!r}; this router runs {sorted(self.engine.policies)}")
        self.engine.active = name

    # -- start-up -------------------------------------------------------------------------------

    def _load_memory(self, up_to_seq: int | None = None) -> None:
        """The FAISS memory from the logged queries (several replicas: as it stood at log position `up_to_seq`)."""
        self.memory.load(*self.store.memory_rows(self.embedder.name, newest=self.config.memory.max_entries, up_to_seq=up_to_seq))
        log.info("memory: %d past queries, %s index", len(self.memory), self.memory.index_kind)
        self.metrics.memory_size.set(len(self.memory))

    def _load_spend(self) -> None:
        for tenant, key in self.spend.budgeted().items():
            since = period_start(key.budget_period, datetime.now(UTC))
            self.spend.load(tenant, self.store.tenant_spend(tenant, since))

    def _current(self, snapshots: dict[str, Any]) -> dict[str, Any]:
        """The snapshots, or none when they were learned under another embedder (the config's `embedder.kind`
        or `path` changed): their models expect other vectors, so the policies start again (from imported
        history, then from the feedback on queries this embedder made). Snapshots older than this check
        name no embedder: the newest logged query's embedder stands for theirs."""
        router_row = snapshots.get(ROUTER_STATE)
        if router_row is None:
            return snapshots
        learned_with = router_row.state.get("embedder") or self.store.newest_embedder()
        if learned_with in (None, self.embedder.name):
            return snapshots
        log.warning("policy snapshots were learned with embedder %s, this router embeds with %s: policies start again",
                    learned_with, self.embedder.name)
        return {}

    def _restore_state(self) -> None:
        """Latest snapshots, then every reward and preference acknowledged after them, in order.

        A policy with no snapshot (new in the config) learns from the whole log.
        """
        snapshots = self._current(self.store.latest_snapshots())
        start: dict[str, tuple[int, int]] = {}
        for name, policy in self.policies.items():
            row = snapshots.get(name)
            if row is not None:
                policy.restore(row.state)
                start[name] = (row.last_reward_id, row.last_preference_id)
            else:
                start[name] = (0, 0)
        warm_start(self.policies, self.policies.keys() - snapshots.keys(), self.db, self.config.backends, self.embedder.embed)
        router_row = snapshots.get(ROUTER_STATE)
        if router_row is not None:
            self.engine.restore(router_row.state)
        router_start = (router_row.last_reward_id, router_row.last_preference_id) if router_row else (0, 0)
        first = min([*start.values(), router_start])
        learned = [router_start[0], router_start[1]]
        for stored in self.store.feedback_since(*first):
            index = 0 if stored.reward is not None else 1
            learners = {name for name, ids in start.items() if ids[index] < stored.feedback_id}
            with_router = router_start[index] < stored.feedback_id
            if stored.vector is not None and (learners or with_router):
                self._apply(stored.decision, stored.vector, stored.reward, stored.preference, learners, with_router)
            learned[index] = max(learned[index], stored.feedback_id)
        self._learned = (learned[0], learned[1])

    def _restore_from_log(self) -> None:
        """Several replicas: the latest snapshots marked with a log position, then every log event after
        them in position order (decisions, outcomes, rewards, preferences), as a running replica applies
        them; a policy with no such snapshot learns from the whole log."""
        snapshots = self._current(self.store.latest_snapshots(logged=True))
        start: dict[str, int] = {}
        for name, policy in self.policies.items():
            row = snapshots.get(name)
            if row is not None:
                policy.restore(row.state)
            start[name] = (row.last_seq or 0) if row is not None else 0
        warm_start(self.policies, self.policies.keys() - snapshots.keys(), self.db, self.config.backends, self.embedder.embed)
        router_row = snapshots.get(ROUTER_STATE)
        if router_row is not None:
            self.engine.restore(router_row.state)
        router_start = (router_row.last_seq or 0) if router_row is not None else 0
        applied = min([*start.values(), router_start])
        # The memory is router state: as of the router's snapshot; the replay adds later queries and their
        # feedback in log order, as it did on every replica that was running.
        self._load_memory(up_to_seq=router_start)
        while True:
            events, more = self.store.log_events(applied, 5000)
            for event in events:
                learners = {name for name, seq in start.items() if seq < event.seq}
                self._apply_event(event, learners, router_start < event.seq)
                applied = event.seq
            if not more:
                break
        self.follower = LogFollower(self.store.log_events, self._apply_event, applied, self.config.cluster.poll_interval_s, self.replica)
        self.follower.on_outage = self._database_down
        self.metrics.memory_size.set(len(self.memory))

    def _apply_event(self, event: LogEvent, learners: set[str] | None = None, with_router: bool = True) -> None:
        """Apply one event of the shared log (several replicas); every replica applies the same events in
        the same order, its own included, so their state is the same once they have applied the same
        position."""
        record = event.decision.record
        if event.kind == "decision":
            if (event.vector is not None and event.embedder == self.embedder.name and event.memory_id is not None
                    and self.memory.entry(record.decision_id) is None):  # another replica's query (ours is there since deciding)
                self.memory.add(np.array([event.memory_id], dtype=np.int64), event.vector.reshape(1, -1),
                                [MemoryEntry(record.decision_id, event.chosen or record.chosen)])
                self.metrics.memory_size.set(len(self.memory))
            if event.decision.kind == "route" and with_router:  # the client calls the backend: the predicted cost is spent
                self.engine.record_outcome(record.decision_id, event.chosen or record.chosen, event.predicted_cost_usd or 0.0, None)
            return
        if event.kind == "outcome":
            if not with_router:
                return
            if event.decision.status == "ok" and record.backend is not None:
                for backend, tokens in event.other_lengths:
                    self.engine.observe_answer_length(backend, tokens)
                self.engine.record_outcome(record.decision_id, record.backend, event.decision.cost_usd or 0.0, event.completion_tokens)
            else:
                self.engine.record_failure(record.decision_id)
            return
        if event.vector is not None and (learners is None or learners or with_router):
            self._apply(event.decision, event.vector, event.reward, event.preference, learners, with_router)
        if self._live:
            self._since_snapshot += 1
            if self._since_snapshot >= self.config.snapshot_every:
                self._since_snapshot = 0
                since, self._interval_start = self._interval_start, event.seq  # a snapshot another replica took since: enough
                self._spawn(self._snapshot_in_background(since))

    async def _snapshot_in_background(self, unless_since: int | None = None) -> None:
        try:
            await self.save_snapshot(unless_since)
        except DatabaseUnavailable as exc:  # the log keeps everything: the next snapshot covers it
            log.warning("snapshot skipped: %s", exc.message)

    # -- database faults --------------------------------------------------------------------------

    @property
    def database_ok(self) -> bool:
        """False from a failed attempt to reach the database until a probe (every second) reaches it again:
        readiness should follow it, so a balancer sends requests elsewhere while it lasts."""
        return self._outage is None

    def _database_down(self, error: Exception) -> None:
        if self._outage is None:
            log.warning("database unavailable: %s", getattr(error, "message", error))
        self._outage = error if isinstance(error, DatabaseUnavailable) else database_error(error) or DatabaseUnavailable(str(error))
        if self._probe_task is None or self._probe_task.done():
            with contextlib.suppress(RuntimeError):  # no running loop (at start): the next request finds out
                self._probe_task = asyncio.get_running_loop().create_task(self._probe_database())

    def _database_up(self) -> None:
        if self._outage is not None:
            log.warning("database reachable again")
            self._outage = None
            if self.follower is not None:
                self.follower.wake()

    async def _probe_database(self) -> None:
        while self._outage is not None:
            await asyncio.sleep(DATABASE_PROBE_S)
            try:
                await asyncio.to_thread(self.store.ping)
            except Exception:  # noqa: BLE001 - still away
                continue
            self._database_up()

    async def _db(self, work: Callable[..., T], *args: Any) -> T:
        """A blocking database read in a worker thread; an outage becomes a 503 (DatabaseUnavailable)."""
        try:
            result = await asyncio.to_thread(work, *args)
        except Exception as exc:
            error = database_error(exc)
            if error is None:
                raise
            self._database_down(error)
            raise error from exc
        self._database_up()
        return result

    async def take_rate_token(self, name: str, capacity: float, per_second: float) -> float:
        """Several replicas: one token from the key's bucket in the database (0, or the seconds to wait)."""
        return await self._db(take_rate_token, self.db, name, capacity, per_second)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.check_backends()
        self._health_task = asyncio.create_task(self._health_loop())
        if self._predicting or self.config.answers.store:  # predictor policies, or answers to train the scorer on
            self.training = TrainingScheduler(self.config, self._trained, lease=self._training_lease if self.clustered else None)
            self.training.start()
        if self.clustered:
            await self._start_cluster()
        self._live = True

    async def _start_cluster(self) -> None:
        """Release what this replica's previous run left (it died with calls running), follow the log,
        listen for its notifications, and catch up before serving."""
        assert self.follower is not None
        cutoff = datetime.now(UTC) - timedelta(seconds=self.config.cluster.orphan_after_s)
        ended = await self.writer.submit(lambda session: release_orphans(session, cutoff, self.replica))
        if ended:
            log.warning("released %d decisions left unanswered by a replica that stopped", len(ended))
        self.follower.start()
        self._listener = Listener(psycopg_url(self.db), [self._log_channel, self._models_channel], asyncio.get_running_loop(),
                                  self._notified, self.follower.wake)
        self._listener.start()
        await self.follower.sync()
        self._interval_start = self.follower.applied
        self._cluster_task = asyncio.create_task(self._cluster_loop())

    def _notified(self, channel: str) -> None:
        if channel == self._models_channel:  # a replica promoted a predictor: swap it in here too
            if self.training is not None or self._predicting:
                self._spawn(asyncio.to_thread(self.predictors.reload))
            return
        assert self.follower is not None
        self.follower.wake()

    async def _cluster_loop(self) -> None:
        """Look for a newly promoted predictor (a missed notification), and release what dead replicas left."""
        cluster = self.config.cluster
        sweep_every = max(5.0, cluster.orphan_after_s / 4)
        swept = time.monotonic()
        while True:
            await asyncio.sleep(cluster.model_poll_s)
            try:
                if self.training is not None or self._predicting:
                    await asyncio.to_thread(self.predictors.reload)
                if time.monotonic() - swept > sweep_every:
                    swept = time.monotonic()
                    cutoff = datetime.now(UTC) - timedelta(seconds=cluster.orphan_after_s)
                    await self.writer.submit(lambda session, before=cutoff: release_orphans(session, before))
            except DatabaseUnavailable:
                continue
            except Exception:  # a failed round must not stop later ones
                log.exception("cluster maintenance failed")

    @contextlib.asynccontextmanager
    async def _training_lease(self, trigger: str) -> Any:
        """Several replicas: one trainer at a time (an advisory lock held for the run); a scheduled run is
        also skipped when another replica already trained in this schedule period. After a run the other
        replicas are told to look for a promoted model."""
        async with advisory_lease(self.db, "train") as held:
            if held and trigger == "schedule":
                held = not await self._db(self._trained_recently)
            yield held
        if held:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(notify, self.db, self._models_channel)

    def _trained_recently(self) -> bool:
        """A training run started within half the schedule's period (on any replica)."""
        runs = recent_runs(self.db, 1)
        if not runs:
            return False
        p = self.config.predictors
        now = datetime.now(UTC)
        if p.schedule == "cron":
            from apscheduler.triggers.cron import CronTrigger

            trigger = CronTrigger.from_crontab(p.cron, timezone="UTC")
            first = trigger.get_next_fire_time(None, now)
            second = trigger.get_next_fire_time(first, first + timedelta(seconds=1)) if first else None
            period = (second - first).total_seconds() if first and second else 3600.0
        else:
            period = p.interval_minutes * 60
        started = datetime.fromisoformat(runs[0]["started_at"])
        started = started if started.tzinfo else started.replace(tzinfo=UTC)
        return (now - started).total_seconds() < period / 2

    async def train(self, trigger: str = "api") -> list[dict[str, Any]]:
        """One predictor training run now (in the worker process), then the hot swap."""
        if self.training is None:
            raise BadRequest(
                f"no predictor policy ({', '.join(PREDICTED_POLICIES)}) runs and answers are not stored (answers.store); nothing to train"
            )
        runs = await self.training.run(trigger)
        if not runs and self.clustered:
            raise Conflict("another replica is training the predictors now (one trainer at a time); "
                           "every replica swaps in the model it promotes")
        return runs

    async def _trained(self, runs: list[dict[str, Any]]) -> None:
        if any(run["promoted"] for run in runs):
            await asyncio.to_thread(self.predictors.reload)

    async def close(self) -> None:
        if self.training is not None:
            self.training.shutdown()
        for task in (self._health_task, self._cluster_task, self._probe_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._listener is not None:
            self._listener.stop()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        try:
            await self.save_snapshot()
        except DatabaseUnavailable as exc:  # the log has everything: the next start replays more of it
            log.warning("no snapshot at shutdown: %s", exc.message)
        if self.follower is not None:
            await self.follower.close()
        await self.writer.close()
        await self.pool.close()
        self._embed_batcher.close()
        if self._predict_batcher is not None:
            self._predict_batcher.close()
        self.db.dispose()

    async def check_backends(self) -> None:
        await self.pool.check_all(self.config.health.timeout_s)
        for name in self.pool.names():
            self.metrics.backend_up.labels(name).set(1 if self.pool.state(name).healthy else 0)

    async def _health_loop(self) -> None:
        purged = 0.0
        while True:
            await asyncio.sleep(self.config.health.interval_s)
            try:
                await self.check_backends()
                if self.config.answers.store and time.monotonic() - purged > ANSWER_PURGE_EVERY_S:
                    purged = time.monotonic()
                    await self.purge_answers()
            except Exception:  # a failed round must not stop later ones
                log.exception("backend health check failed")

    async def purge_answers(self) -> int:
        """Erase stored answers older than the retention period (runs hourly while answers are stored)."""
        before = datetime.now(UTC) - timedelta(days=self.config.answers.retention_days)
        return await self.writer.submit(lambda session: purge_answers(session, before), logged=False)

    def _spawn(self, coroutine: Any) -> None:
        """Work that goes on after the response (closing waits for it); its failure is logged."""
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            log.error("background work failed: %s", getattr(error, "message", None) or repr(error))

    # -- deciding ---------------------------------------------------------------------------------

    async def embed(self, text: str) -> np.ndarray:
        return await self._embed_batcher.one(text)

    async def _predict(self, query: str) -> Predictions | None:
        if self._predict_batcher is None or not self.predictors.ready:
            return None
        return await self._predict_batcher.one(query)

    async def decide(self, request: RoutingRequest, kind: str, tenant: str | None) -> Routed:
        """Decide and log. The caller's spending limit is read and the worst case reserved in one step
        of the event loop (after the embedding await), so concurrent requests cannot overshoot it.

        Several replicas: the limit and the pacing headroom are read from the database, and the write
        that logs the decision also takes its holds with conditional updates; when another replica took
        the room first, the decision is forgotten and made again with what is left (a 429 once the key's
        budget has no room for even the cheapest candidate)."""
        started = time.perf_counter()
        policy_name = request.policy or self.active_policy
        if policy_name not in self.policies:
            raise BadRequest(f"unknown policy {policy_name!r}; this router runs {sorted(self.policies)}")
        pinned = request.model if request.model != "auto" else None
        if pinned is not None and pinned not in self.pool:
            raise NotFound(f"unknown backend {pinned!r}; use \"auto\" or one of {self.pool.names()}")
        names = [pinned] if pinned else [s.spec.name for s in self.pool.eligible(estimate_tokens(request.prompt))]
        if not names:
            raise ServiceUnavailable("no backend available: every backend's circuit breaker is open after failures")

        vector, predictions = await asyncio.gather(self.embed(request.query), self._predict(request.query))
        predictions = self.predictors.with_mf(predictions, vector)
        cap = request.max_cost_usd if request.max_cost_usd is not None else (self.config.budget.default_max_cost_usd or None)
        candidates = [
            Arm(n, self.pool.state(n).spec.price_per_1m_input_tokens_usd, self.pool.state(n).spec.price_per_1m_output_tokens_usd)
            for n in names
        ]
        for _ in range(HOLD_ATTEMPTS):
            decision_id = "dec_" + uuid.uuid4().hex
            memory_id = uuid.uuid4().int >> 65  # 63 bits: a positive int64 id for FAISS
            limit, headroom = await self._room(tenant)
            record = self.engine.decide(
                decision_id, memory_id, vector, estimate_tokens(request.prompt), candidates, policy=policy_name, pinned=pinned,
                max_cost_usd=cap, output_limit=request.output_limit, spend_limit=limit, predictions=predictions, headroom_usd=headroom,
            )
            plan = self._plan(request, record, kind, cap, pinned is not None)
            if limit is not None and plan.worst_case_usd > limit.remaining_usd:  # every call must fit: fall back to one
                plan = self._plan(request, record, "route", cap, True)
            record.mode = plan.mode
            if not self.clustered:
                self.spend.reserve(tenant, decision_id, plan.worst_case_usd)
            self.engine.pacer.reserve(decision_id, plan.predicted_usd)
            routed = Routed(record, kind, tenant, pinned is not None, plan)
            holds = self._holds(routed, tenant) if self.clustered else []
            routed.rules = [hold.rule for hold in holds]
            new = NewDecision(record, kind, tenant, request.model, request.query, (time.perf_counter() - started) * 1000, memory_id,
                              self.embedder.name, vector, self.replica)
            if kind == "chat":
                self._answering[decision_id] = asyncio.get_running_loop().create_future()
            try:
                await self.writer.submit(self._logging(new, holds))
            except HoldRefused:  # another replica took the room first: decide again with what is left
                self.engine.forget(decision_id)
                self._answered(decision_id)
                continue
            except BaseException:  # not logged, so not remembered either (and not counted against the tenant)
                self.engine.forget(decision_id)
                self.spend.settle(tenant, decision_id, 0.0)
                self._answered(decision_id)
                raise
            break
        else:
            raise (limit.refuse(record.worst_case_usd) if limit is not None else ServiceUnavailable(
                "the pacing budget is contended by other replicas; retry"))
        if kind == "route" and not self.clustered:  # the client calls the backend itself: the predicted cost is what it spends
            self.spend.settle(tenant, decision_id, record.predicted_cost_usd)
            self.engine.record_outcome(decision_id, record.chosen, record.predicted_cost_usd, None)
        self.metrics.memory_size.set(len(self.memory))
        self.metrics.decisions.labels(record.policy, record.chosen, kind).inc()
        self.metrics.decision_seconds.observe(time.perf_counter() - started)
        return routed

    async def _room(self, tenant: str | None) -> tuple[SpendLimit | None, float | None]:
        """The tenant's spending limit, and the pacing headroom to use instead of the engine's own (None:
        the engine's). One process: the in-memory ledger. Several replicas: the database's rows."""
        if not self.clustered:
            return self.spend.limit(tenant), None
        key = self.spend.rule(tenant)
        rules = [rule for rule in (key, self._pacing_rule) if rule is not None]
        if not rules:
            return None, None
        room = await self._db(self.store.spend_headroom, rules)
        limit = self.spend.shared_limit(tenant, room[key.scope][1]) if key is not None and tenant is not None else None
        headroom = room[self._pacing_rule.scope][0] if self._pacing_rule is not None else None
        return limit, headroom

    def _holds(self, routed: Routed, tenant: str | None) -> list[Hold]:
        """Several replicas: what the decision's write takes from the database's spend rows: the key's
        worst case, and the predicted cost against the pacing target (the cheapest candidate, a pinned
        backend and a multi-call plan go whatever the headroom, as in one process). A `/v1/route`
        decision spends its predicted cost at once."""
        record, plan = routed.record, routed.plan
        charge = record.predicted_cost_usd if routed.kind == "route" else None
        holds = []
        key = self.spend.rule(tenant)
        if key is not None:
            holds.append(Hold(key, plan.worst_case_usd, charge))
        if self._pacing_rule is not None:
            cheapest = min((a.predicted_cost_usd for a in record.arms), default=0.0)
            force = routed.pinned or plan.mode != ROUTE or record.predicted_cost_usd <= cheapest + 1e-15
            holds.append(Hold(self._pacing_rule, plan.predicted_usd, charge, force))
        return holds

    @staticmethod
    def _alone(bulk: Callable[[Any, list[Any]], list[Any]], item: Any) -> Callable[[Any], Any]:
        """A bulk write of one item in its own savepoint (several replicas: see `_logging`)."""
        def write(session: Any) -> Any:
            result = bulk(session, [item])[0]
            if isinstance(result, Exception):
                raise result
            return result
        return write

    def _logging(self, new: NewDecision, holds: list[Hold]) -> Callable[[Any], None] | Batched:
        """The decision's write: batched with the other decisions of its commit in one process. Several
        replicas write each decision (and each feedback) in its own savepoint: holds must fit the spend rows
        one decision at a time, and with batched writes a replica started later sometimes ended with other
        learned state than the running ones (tests/router/test_cluster.py, 1 run in 8; cause not found)."""
        if not holds and not self.clustered:
            return Batched(add_decisions, new)

        def write(session: Any) -> None:
            add_decisions(session, [new])
            take_holds(session, new.record.decision_id, holds, self.replica)
        return write

    def _plan(self, request: RoutingRequest, record: DecisionRecord, kind: str, cap: float | None, pinned: bool) -> Plan:
        """The calls the request's mode will make (`/v1/route` decides one backend: always `route`)."""
        mode = (request.mode or self.config.modes.default) if kind == "chat" else ROUTE
        quality = self.engine.quality_estimates(record.policy) if mode == "cascade" else {}
        return plan_calls(mode, record, self.config.modes, quality, request.output_limit, cap, pinned, request.judge)

    async def route(self, request: RoutingRequest, tenant: str | None = None) -> Routed:
        return await self.decide(request, "route", tenant)

    # -- generating -------------------------------------------------------------------------------

    def _on_backend_error(self, routed: Routed, error: BackendError) -> None:
        self.metrics.requests.labels(error.backend, "rejected" if error.client_fault else "error").inc()
        log.warning("decision %s: %s", routed.decision_id, error)

    def _terminal_error(self, routed: Routed, exhausted: FailoverExhausted) -> Exception:
        error = exhausted.last_error
        if error is not None and not error.retryable:
            return UpstreamClientError(str(error), error.status)
        detail = f"; last error: {error}" if error else ""
        if error is not None and error.status == 504 and len(routed.order) == 1:
            return GatewayTimeout(f"backend {error.backend} timed out{detail}")
        if routed.pinned:
            return BadGateway(f"backend {routed.order[0]} failed{detail}")
        reasons = "; ".join(f"{f.backend}: {f.reason}" for f in routed.failures)
        return ServiceUnavailable(f"every candidate backend failed ({reasons})")

    def _answered(self, decision_id: str) -> None:
        """The decision's final write is done (or will never come): feedback on it may proceed."""
        waiting = self._answering.pop(decision_id, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    async def _finish(self, routed: Routed, finish: Finish) -> None:
        """The final write of a chat decision; the tenant's reservation becomes the real cost (several
        replicas: in the same transaction, on the database's spend rows)."""
        charges = [(rule, finish.cost_usd or 0.0, finish.status == "ok") for rule in routed.rules]

        def write(session: Any) -> None:
            finish_decision(session, routed.decision_id, finish)
            if charges:
                settle_holds(session, routed.decision_id, charges)

        try:
            if not self.clustered:
                self.spend.settle(routed.tenant, routed.decision_id, finish.cost_usd or 0.0)
            await self.writer.submit(write)
        finally:
            self._answered(routed.decision_id)

    def _record_answer(self, routed: Routed, backend: str, completion_tokens: int, cost_usd: float, latency_ms: float) -> None:
        routed.record.backend = backend
        routed.cost_usd = cost_usd
        if not self.clustered:  # several replicas: every replica records it when it applies the outcome from the log
            self.engine.record_outcome(routed.decision_id, backend, cost_usd, completion_tokens)
        if routed.plan.mode == ROUTE:  # a mode counts each of its calls as it makes them
            self.metrics.requests.labels(backend, "ok").inc()
            self.metrics.cost.labels(backend).inc(cost_usd)
        self.metrics.backend_seconds.labels(backend).observe(latency_ms / 1000)

    def _failures(self, routed: Routed) -> list[dict[str, Any]]:
        return [{"backend": f.backend, "status": f.status, "reason": f.reason} for f in routed.failures]

    async def _fail(self, routed: Routed, exhausted: FailoverExhausted) -> Exception:
        self.engine.record_failure(routed.decision_id)
        status = "rejected" if exhausted.last_error is not None and exhausted.last_error.client_fault else "error"
        await self._finish(routed, Finish(status, self._failures(routed), error=str(exhausted.last_error)))
        return self._terminal_error(routed, exhausted)

    async def _call(self, routed: Routed, call: Callable[[BackendState], Awaitable[T]]) -> tuple[str, T]:
        """`call` the decision's backends with failover; a decision that gets no answer is finished as an error."""
        try:
            return await self.pool.call_with_failover(
                routed.order, call, pinned=routed.pinned, failures=routed.failures,
                on_error=lambda error: self._on_backend_error(routed, error),
            )
        except FailoverExhausted as exhausted:
            raise await self._fail(routed, exhausted) from None
        except BaseException:
            self.engine.record_failure(routed.decision_id)
            self._spawn(self._finish(routed, Finish("error", self._failures(routed), error="request cancelled")))
            raise

    async def chat(self, request: RoutingRequest, tenant: str | None = None) -> tuple[dict[str, Any], Routed]:
        """A routed completion: the backend's response body (as it sent it) and the decision."""
        routed = await self.decide(request, "chat", tenant)
        if routed.plan.mode != ROUTE:
            return await self._answer_with_mode(routed, request), routed
        backend, result = await self._call(routed, lambda state: state.client.chat(request.body))
        self._record_answer(routed, backend, result.completion_tokens, result.cost_usd, result.latency_ms)
        self._spawn(self._finish(routed, Finish(  # not on the response path: feedback on it waits for this write
            "ok", self._failures(routed), backend=backend, prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens, cost_usd=result.cost_usd, latency_ms=result.latency_ms,
            answer=self._kept(answer_text(result.body)),
        )))
        return result.body, routed

    def _kept(self, answer: str | None) -> str | None:
        """Answer texts are stored only when configured (privacy)."""
        return answer if self.config.answers.store else None

    async def _call_for_mode(self, routed: Routed, backend: str, role: str, body: dict[str, Any]) -> Call:
        """One call of a mode, failing over to candidates the plan does not already ask at this step."""
        planned = {*routed.plan.first, *routed.plan.second}
        order = [backend] if routed.pinned else [backend, *[b for b in routed.order if b not in planned]]
        call = Call(0, role, backend)
        started = time.perf_counter()
        try:
            answered_by, result = await self.pool.call_with_failover(
                order, lambda state: state.client.chat(body), pinned=routed.pinned, failures=routed.failures,
                on_error=lambda error: self._on_backend_error(routed, error),
            )
        except FailoverExhausted as exhausted:
            call.status, call.error = "error", str(exhausted.last_error or exhausted)
            call.latency_ms = (time.perf_counter() - started) * 1000
            return call
        call.backend, call.body, call.answer = answered_by, result.body, answer_text(result.body)
        call.prompt_tokens, call.completion_tokens = result.prompt_tokens, result.completion_tokens
        call.cost_usd, call.latency_ms = result.cost_usd, result.latency_ms
        self.metrics.requests.labels(answered_by, "ok").inc()
        self.metrics.cost.labels(answered_by).inc(result.cost_usd)
        return call

    async def _score_answers(self, query: str, answers: list[str], backends: list[str]) -> tuple[list[float], str]:
        """The answer scorer's scores (with its learned prior of each backend) when one is trained, else
        agreement among the answers."""
        scores = await asyncio.to_thread(self.predictors.score, query, answers, backends)
        if scores is not None:
            return list(scores), "scorer"
        vectors = await asyncio.to_thread(self.embedder.embed, answers) if len(answers) > 1 else None
        return agreement(answers, vectors), "agreement"

    def _cascade_bar(self, record: DecisionRecord, next_backend: str, judge: str) -> float | None:
        """Stop before `next_backend` when an answer scores this much: the configured threshold, lowered by
        lambda times that call's predicted cost in reward units. None: judged by a scorer and none is
        trained, so there is no absolute score."""
        if judge != VERIFY and self.predictors.scorer is None:
            return None
        arm = next((a for a in record.arms if a.name == next_backend), None)
        penalty = record.cost_weight * (arm.predicted_cost_usd if arm else 0.0) / record.cost_scale if record.cost_scale else 0.0
        bar = self.config.modes.cascade_threshold
        return bar - min(bar, penalty)

    async def _answer_with_mode(self, routed: Routed, request: RoutingRequest) -> dict[str, Any]:
        """Run an answer-aware mode: every call logged under the decision, the delivered answer's body back."""
        started = time.perf_counter()
        try:
            result = await run_mode(
                routed.plan, request.query, request.body,
                lambda backend, role, body: self._call_for_mode(routed, backend, role, body),
                self._score_answers, lambda backend: self._cascade_bar(routed.record, backend, routed.plan.judge),
            )
        except BaseException:
            self.engine.record_failure(routed.decision_id)
            self._spawn(self._finish(routed, Finish("error", self._failures(routed), error="request cancelled")))
            raise
        routed.calls = result.calls
        answered = [c for c in result.calls if c.status == "ok"]
        routed.cost_usd = sum(c.cost_usd or 0.0 for c in answered)
        latency_ms = (time.perf_counter() - started) * 1000
        calls = tuple(replace_answer(c, self._kept(c.answer)) for c in result.calls)
        delivered = result.delivered
        if delivered is None or delivered.body is None:
            exhausted = FailoverExhausted(None, routed.failures)
            self.engine.record_failure(routed.decision_id)
            await self._finish(routed, Finish("error", self._failures(routed), error="no call of the mode answered",
                                              cost_usd=routed.cost_usd or None, latency_ms=latency_ms, calls=calls))
            raise self._terminal_error(routed, exhausted)
        for call in answered:
            if call is not delivered and call.role != VERIFY and call.completion_tokens is not None and not self.clustered:
                self.engine.observe_answer_length(call.backend, call.completion_tokens)
        self._record_answer(routed, delivered.backend, delivered.completion_tokens or 0, routed.cost_usd, latency_ms)
        self._spawn(self._finish(routed, Finish(  # not on the response path: feedback on it waits for this write
            "ok", self._failures(routed), backend=delivered.backend, prompt_tokens=delivered.prompt_tokens,
            completion_tokens=delivered.completion_tokens, cost_usd=routed.cost_usd, latency_ms=latency_ms,
            answer=self._kept(delivered.answer), calls=calls,
        )))
        body = dict(delivered.body)
        body["usage"] = _summed_usage(answered)
        return body

    async def chat_stream(self, request: RoutingRequest, tenant: str | None = None) -> tuple[AsyncIterator[StreamEvent], Routed]:
        """Open the upstream stream (failing over before the first event), then relay its events.

        A failure before the first event fails over like a failed open; one in mid-stream ends the
        relay with a `StreamError`, never a hang.
        """
        routed = await self.decide(request, "chat", tenant)
        if routed.plan.mode != ROUTE:  # a mode must see whole answers: the delivered one streams once chosen
            return _as_stream(await self._answer_with_mode(routed, request)), routed

        async def open_stream(state: BackendState) -> tuple[AsyncIterator[dict[str, Any] | None], StreamUsage, dict[str, Any] | None]:
            events, usage = await state.client.open_stream(request.body)
            try:
                first = await anext(events)  # an error in the first event still gets an HTTP status and failover
            except BaseException:
                await events.aclose()
                raise
            return events, usage, first

        backend, (events, usage, first) = await self._call(routed, open_stream)
        routed.record.backend = backend
        return self._relay(routed, backend, first, events, usage), routed

    async def _relay(
        self, routed: Routed, backend: str, first: dict[str, Any] | None, events: AsyncIterator[dict[str, Any] | None], usage: StreamUsage
    ) -> AsyncIterator[StreamEvent]:
        error: BackendError | None = None
        try:
            yield first
            async with contextlib.aclosing(events) as upstream:  # frees the backend slot if the client leaves
                async for event in upstream:
                    if event is not None and event.get("usage"):
                        routed.cost_usd = usage.cost_usd
                    yield event
        except BackendError as exc:
            error = exc
            routed.failures.append(Failure(backend, exc.status, str(exc)))
            self.pool.record_error(exc)
            self._on_backend_error(routed, exc)
            yield StreamError(str(exc), exc.retryable, exc.status)
        finally:
            if usage.completed and error is None:
                self._record_answer(routed, backend, usage.completion_tokens, usage.cost_usd, usage.latency_ms)
                finish = Finish("ok", self._failures(routed), backend=backend, prompt_tokens=usage.prompt_tokens,
                                completion_tokens=usage.completion_tokens, cost_usd=usage.cost_usd, latency_ms=usage.latency_ms)
            else:
                self.engine.record_failure(routed.decision_id)
                finish = Finish("error", self._failures(routed), backend=backend,
                                error=str(error) if error else "stream ended early (client gone or backend closed)",
                                cost_usd=usage.cost_usd or None, latency_ms=usage.latency_ms)
            self._spawn(self._finish(routed, finish))

    # -- feedback ---------------------------------------------------------------------------------

    def _apply(
        self,
        decision: StoredDecision,
        vector: np.ndarray,
        reward: float | None,
        preference: tuple[str, str] | None,
        learners: set[str] | None = None,
        with_router: bool = True,
    ) -> None:
        """Teach the engine (all policies, or only `learners`) one logged reward or preference. Feedback on a
        query embedded by another embedder (made before `embedder.kind` or `path` changed) is recorded
        but teaches nothing: its vector does not fit the policies' models."""
        if vector.shape[-1] != self.embedder.dim:
            return
        if preference is not None:
            self.engine.learn_preference(decision.record, vector, *preference, learners=learners)
            return
        assert reward is not None
        self.engine.learn(decision.record, vector, reward, decision.cost_for_learning, decision.latency_ms or 0.0,
                          learners=learners, with_router=with_router)

    async def wait_for_final_write(self, decision_id: str) -> None:
        """Until the decision's final write (outcome, cost, calls) is committed: it follows the answer out.
        Feedback on a decision waits here, so learning always sees the backend that answered and the real
        cost (a Conflict after FEEDBACK_WAIT_S, e.g. a stream still in progress)."""
        waiting = self._answering.get(decision_id)
        if waiting is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(waiting), FEEDBACK_WAIT_S)
        except TimeoutError:
            raise Conflict(f"decision {decision_id} is still being answered; post feedback once the answer is complete") from None

    async def feedback(
        self, decision_id: str, tenant: str | None, reward: float | None = None, preference: tuple[str, str] | None = None
    ) -> FeedbackResult:
        """Record a reward or a preference durably; every policy learns from it right after the commit.

        Only the key that made the decision may give feedback on it. Several replicas: the answer comes
        once this replica has applied the log up to (at least) this feedback, so a client that posts a
        reward and then asks the same replica sees it learned (read-your-writes); feedback on a chat
        decision another replica is still answering waits for its outcome, as in one process.
        """
        if preference is not None:
            unknown = [b for b in preference if b not in self.pool]
            if unknown:
                raise BadRequest(f"unknown backends {unknown} in preference; known: {self.pool.names()}")
        await self.wait_for_final_write(decision_id)
        feedback = NewFeedback(decision_id, tenant, reward, preference, self.replica)
        write = Batched(self._record_feedback, feedback) if not self.clustered else self._alone(self._record_feedback, feedback)

        def learn(recorded: RecordedFeedback) -> None:
            if recorded.duplicate:
                return
            if recorded.vector is not None:
                self._apply(recorded.decision, recorded.vector, reward, preference)
            rewards, preferences = self._learned
            feedback_id = recorded.feedback_id
            self._learned = (max(rewards, feedback_id), preferences) if preference is None else (rewards, max(preferences, feedback_id))
            self._since_snapshot += 1

        kind = "reward" if preference is None else "preference"
        if self.clustered:
            duplicate = await self._feedback_through_log(decision_id, write)
        else:
            duplicate = (await self.writer.submit(write, learn)).duplicate
        if not duplicate:
            self.metrics.rewards.labels(kind).inc()
            if not self.clustered and self._since_snapshot >= self.config.snapshot_every:
                self._since_snapshot = 0
                self._spawn(self._snapshot_in_background())
        return FeedbackResult(decision_id, kind, duplicate)

    def _feedback_refusal(self, decision: StoredDecision, feedback: NewFeedback) -> Exception | None:
        """Why feedback on `decision` is not taken (None: it is): only the key that made a decision may give
        feedback on it, and only on one that produced an answer."""
        if decision.tenant != feedback.tenant:
            return Forbidden(f"decision {feedback.decision_id} was made by another key; only that key may give feedback on it")
        if decision.status in ("error", "rejected"):
            return Conflict(f"decision {feedback.decision_id} produced no answer ({decision.error}); nothing to reward")
        if self.clustered and decision.kind == "chat" and decision.status == "routed":
            return _StillAnswering()
        return None

    async def _feedback_through_log(self, decision_id: str, write: Batched) -> bool:
        """Several replicas: write the feedback (waiting while another replica still answers the decision),
        then apply the log up to it. Returns whether it was a duplicate."""
        deadline = time.monotonic() + FEEDBACK_WAIT_S
        pause = 0.02
        while True:
            try:
                duplicate = (await self.writer.submit(write)).duplicate
                break
            except _StillAnswering:
                if time.monotonic() > deadline:
                    raise Conflict(f"decision {decision_id} is still being answered; post feedback once the answer is complete") from None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)
        assert self.follower is not None
        await self.follower.sync()  # committed: once applied here, answer
        return bool(duplicate)

    async def save_snapshot(self, unless_since: int | None = None) -> bool:
        """Every policy's and the router's state, marked with the last feedback they include.

        Taken in one step of the event loop, where learning also happens, so it is consistent. Several
        replicas: marked with the log position applied, and written by one replica at a time (one that
        finds the lock taken, or a snapshot at or after `unless_since` (default: its own position), skips).
        Returns whether it wrote.
        """
        states = {name: policy.snapshot() for name, policy in self.policies.items()}
        states[ROUTER_STATE] = {**self.engine.snapshot(), "embedder": self.embedder.name}  # what the policies learned with
        learned = self._learned
        if self.follower is None:
            return bool(await self.writer.submit(lambda session: write_snapshot(session, states, *learned), logged=False))
        seq = self.follower.applied
        return bool(await self.writer.submit(
            lambda session: write_snapshot(session, states, *learned, last_seq=seq, exclusive=True, unless_since=unless_since), logged=False
        ))

    # -- inspection -------------------------------------------------------------------------------

    async def _predictor_stats(self) -> dict[str, Any]:
        return {
            "models": await asyncio.to_thread(self.predictors.describe),
            "next_run": self.training.next_run() if self.training else None,
            "runs": await self._db(recent_runs, self.db),
        }

    async def _cluster_stats(self) -> dict[str, Any] | None:
        """Several replicas: who this is, how far behind the shared log it may be, and the money the database holds."""
        if self.follower is None:
            return None
        head = await self._db(self.store.log_head)
        return {
            "replica": self.replica,
            "database_ok": self.database_ok,
            "notifications": self._listener is not None and self._listener.connected,
            "lag": {**self.follower.lag(), "head_seq": head, "behind": max(0, head - self.follower.applied)},
            "spend": await self._db(self.store.spend_rows),
        }

    def _tenant_spend(self, rows: list[dict[str, Any]] | None) -> dict[str, Any]:
        if rows is None:
            return self.spend.describe()
        now = datetime.now(UTC)
        spent = {(r["scope"], r["period_start"]): r["spent_usd"] + r["running_usd"] for r in rows}
        described = {}
        for name, key in self.spend.budgeted().items():
            period = period_start(key.budget_period, now).isoformat()
            described[name] = {"max_spend_usd": key.max_spend_usd, "period": key.budget_period,
                               "spent_usd": spent.get((f"key:{name}", period), 0.0)}
        return described

    async def stats(self) -> dict[str, Any]:
        summary = await self._db(self.store.summary)
        cluster = await self._cluster_stats()
        engine = self.engine.stats()
        policies = {
            name: {**policy.stats(), "decisions": summary["policies"].get(name, {}), "shadow": engine["shadow"][name],
                   "learn_errors": engine["learn_errors"][name]}
            for name, policy in self.policies.items()
        }
        return {
            "active_policy": self.active_policy,
            "policies": policies,
            "pinned": summary["policies"].get(PINNED, {}),
            "backends": summary["backends"],
            "budget": engine["budget"],
            "expected_output_tokens": engine["expected_output_tokens"],
            "memory_queries": len(self.memory),
            "tenant_spend": self._tenant_spend(cluster["spend"] if cluster else None),
            "predictors": await self._predictor_stats(),
            "failover": {
                name: {"failures": self.pool.state(name).failures, "breaker": self.pool.state(name).breaker.describe()}
                for name in self.pool.names()
            },
            "cluster": cluster,
        }

    async def timeline(self, window_s: float, buckets: int, recent: int) -> Timeline:
        """The dashboard's series over the last `window_s` seconds in `buckets` steps, and the `recent` newest decisions."""
        now = datetime.now(UTC)
        pacer = self.engine.pacer
        keys = [KeyBudget(name, key.max_spend_usd, key.budget_period, period_start(key.budget_period, now))
                for name, key in self.spend.budgeted().items()]
        budgets = Budgets(pacer.target_usd_per_query, pacer.target_usd_per_hour, keys)
        return await self._db(build_timeline, self.store, now, window_s, buckets, list(self.policies), budgets, recent)


class _StillAnswering(Exception):
    """Several replicas: the decision's outcome is not written yet (its replica is still answering)."""


def replace_answer(call: Call, answer: str | None) -> Call:
    """The call as logged: its answer text only when kept, and never the response body."""
    return dataclasses.replace(call, answer=answer, body=None)


def _summed_usage(calls: list[Call]) -> dict[str, int]:
    """Usage of a multi-call answer: every call's tokens (what was paid for)."""
    prompt = sum(c.prompt_tokens or 0 for c in calls)
    completion = sum(c.completion_tokens or 0 for c in calls)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _as_stream(body: dict[str, Any]) -> AsyncIterator[StreamEvent]:
    """A whole answer as chat-completion chunks: the content, the finish reason, the usage, the end."""
    choice = (body.get("choices") or [{}])[0]
    base = {"id": body.get("id", ""), "object": "chat.completion.chunk", "created": body.get("created", int(time.time())),
            "model": body.get("model", "")}
    content = (choice.get("message") or {}).get("content") or ""
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}]}
    yield {**base, "choices": [], "usage": body.get("usage")}
    yield None
