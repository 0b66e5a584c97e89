"""Several replicas on one PostgreSQL, in one test process (fast, deterministic): one log applied in one
order by every replica, snapshots and catch-up at start, money and rate limits held in the database,
one snapshot writer, predictor swaps announced, a database outage answered 503 and recovered from.

The real thing (three `llm-router serve` processes behind HAProxy, `kill -9`) is in test_replicas.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, func, select
from sqlmodel import Session

from policies import Context
from router.config import ConfigError, load_config
from router.db import normalise_url
from router.errors import TooManyRequests
from router.service import RouterService
from router.tables import DecisionRow, PolicySnapshot, Reward, Spend
from tests.conftest import backend_table, chat_request, free_port, write_config
from tests.fake_backend import FakeVLLM

pytestmark = pytest.mark.postgres

QUERIES = [
    "What is the capital of France?", "Prove that sqrt(2) is irrational.", "Write a haiku about rain.",
    "Sort a list in Python.", "Explain TCP slow start.", "How many legs has a spider?", "Translate 'cat' to German.",
    "What is 17 * 23?", "Name three prime numbers.", "Summarise the plot of Hamlet.",
]


@pytest.fixture
def fakes():
    servers = {"cheap": FakeVLLM("cheap"), "dear": FakeVLLM("dear")}
    yield servers
    for server in servers.values():
        server.close()


def _backends(fakes: dict[str, FakeVLLM]) -> str:
    return backend_table("cheap", fakes["cheap"].port, 0.0, 100.0) + backend_table("dear", fakes["dear"].port, 0.0, 1000.0)


def replica_config(tmp_path: Path, url: str, fakes: dict[str, FakeVLLM], name: str, extra: str = "", cluster: str = "") -> Path:
    top = 'policies = ["thompson", "qlearning", "vw", "elo", "gradient", "random"]\nsnapshot_every = 7\n' + extra
    return write_config(tmp_path / f"{name}.toml", url, _backends(fakes),
                        f'{top}\n[cluster]\nenabled = true\nreplica_id = "{name}"\npoll_interval_s = 0.3\n{cluster}',
                        health_interval_s=600)


async def start_replica(path: Path, embedder: Any) -> RouterService:
    service = RouterService(load_config(path, environ={}), embedder=embedder)
    await service.start()
    return service


def probe_scores(service: RouterService, vector: np.ndarray) -> dict[str, dict[str, float]]:
    """Every policy's scores for one query, with this replica's memory and budget (changes no state that matters)."""
    engine = service.engine
    neighbours = engine.memory.search(vector, engine.neighbours)
    from policies import Arm

    arms = tuple(Arm(n, 0.0, p, p * 16 / 1e6) for n, p in (("cheap", 100.0), ("dear", 1000.0)))
    context = Context(vector, 10, arms, neighbours, engine.pacer.lam, engine.pacer.cost_scale([a.predicted_cost_usd for a in arms]))
    return {name: policy.score(context).scores for name, policy in engine.policies.items() if name != "random"}


def learned_state(service: RouterService) -> dict[str, Any]:
    """What the replicas must agree on: every policy's learning, the shadow estimates, pacing, the memory."""
    policies = {}
    for name, policy in service.policies.items():
        stats = policy.stats()
        internals = {k: v for k, v in (stats.get("internals") or {}).items() if k != "arguments"}  # vw: names a restored model's file
        policies[name] = {"arms": {a: {k: v for k, v in arm.items() if k != "pulls"} for a, arm in stats["arms"].items()},
                          "internals": internals}
    engine = service.engine.stats()
    budget = {k: engine["budget"][k] for k in ("lambda", "spent_usd", "queries", "recent_mean_cost_usd")}
    memory = sorted((e.decision_id, e.backend, e.reward, e.preference, e.output_tokens) for e in service.memory._entries.values())
    return {"policies": policies, "shadow": engine["shadow"], "budget": budget, "lengths": engine["expected_output_tokens"],
            "memory": memory}


def test_several_replicas_refuse_sqlite(tmp_path, sqlite_url, fakes, capsys):
    path = replica_config(tmp_path, sqlite_url, fakes, "r1")
    with pytest.raises(ConfigError, match="cluster.enabled: several replicas .* PostgreSQL .* DATABASE_URL=postgresql"):
        load_config(path, environ={})
    from router.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--config", str(path), "--port", str(free_port())])
    assert exit_.value.code == 2
    assert "several replicas" in capsys.readouterr().err


async def test_every_replica_applies_every_write_in_one_order(tmp_path, pg_url, embedder, fakes):
    """Chats and rewards spread over two replicas at once: both end with the same learning, the same
    memory and the same scores for a query; a third replica started afterwards restores the latest
    snapshot, catches up from the log, and agrees too."""
    a = await start_replica(replica_config(tmp_path, pg_url, fakes, "r1"), embedder)
    b = await start_replica(replica_config(tmp_path, pg_url, fakes, "r2"), embedder)
    replicas = [a, b]
    try:
        async def one(i: int) -> None:
            service = replicas[i % 2]
            _, routed = await service.chat(chat_request(QUERIES[i % len(QUERIES)] + f" #{i}", max_tokens=8))
            feedback_on = replicas[(i // 2) % 2]  # half the feedback goes to the other replica
            if i % 5 == 4:
                await feedback_on.feedback(routed.decision_id, None, preference=("dear", "cheap"))
            else:
                await feedback_on.feedback(routed.decision_id, None, reward=(i % 7) / 6)

        await asyncio.gather(*(one(i) for i in range(40)))
        routes = [await replicas[i % 2].route(chat_request(QUERIES[i] + " route", max_tokens=8)) for i in range(6)]
        for i, routed in enumerate(routes):
            await replicas[i % 2].feedback(routed.decision_id, None, reward=0.5)
        for service in replicas:
            await service.follower.sync()
        assert a.follower.applied == b.follower.applied
        assert learned_state(a) == learned_state(b)
        vector = embedder.embed(["What is the capital of Spain?"])[0]
        assert probe_scores(a, vector) == probe_scores(b, vector)
        assert len(a.memory) == len(b.memory) == 46
        with Session(a.db) as session:
            assert session.execute(select(func.count()).select_from(PolicySnapshot).where(PolicySnapshot.last_seq.is_not(None))).scalar() > 0

        c = await start_replica(replica_config(tmp_path, pg_url, fakes, "r3"), embedder)
        replicas.append(c)
        assert learned_state(c) == learned_state(a)
        assert probe_scores(c, vector) == probe_scores(a, vector)
        stats = await c.stats()
        assert stats["cluster"]["replica"] == "r3" and stats["cluster"]["lag"]["behind"] == 0
        assert stats["cluster"]["lag"]["applied_seq"] == a.follower.applied
    finally:
        for service in replicas:
            await service.close()


BUDGET_KEY = "a" * 64


def budget_auth(max_spend_usd: float, requests_per_minute: float = 0, burst: int = 1) -> str:
    return (f'[budget]\ntarget_usd_per_query = 0.0005\n[auth]\nopen_on_loopback = true\n[[auth.keys]]\nname = "team"\n'
            f'key_sha256 = "{BUDGET_KEY}"\nmax_spend_usd = {max_spend_usd!r}\nrequests_per_minute = {requests_per_minute}\n'
            f'burst = {burst}\n')


async def test_a_budget_holds_across_replicas_under_concurrent_load(tmp_path, pg_url, embedder, fakes):
    """A key with a budget for 6 calls (each call's worst case is exactly its real cost), 30 concurrent
    calls spread over two replicas: exactly 6 are answered, the rest get the budget's 429, and the
    database never holds more spent than the limit; the pacing row counts every answer."""
    calls = 6
    limit = calls * 100 / 1e6 + 1e-9  # pinned to "cheap": 1 output token at $100 per million, no input price
    a = await start_replica(replica_config(tmp_path, pg_url, fakes, "r1", budget_auth(limit)), embedder)
    b = await start_replica(replica_config(tmp_path, pg_url, fakes, "r2", budget_auth(limit)), embedder)
    try:
        async def one(i: int) -> str:
            service = (a, b)[i % 2]
            try:
                _, routed = await service.chat(chat_request(f"Hi {i}", model="cheap", max_tokens=1), "team")
            except TooManyRequests as exc:
                assert exc.type == "insufficient_quota" and "team" in exc.message
                return "refused"
            await service.wait_for_final_write(routed.decision_id)  # the settling write follows the answer out
            return "answered"

        outcomes = await asyncio.gather(*(one(i) for i in range(30)))
        assert outcomes.count("answered") == calls, outcomes
        with Session(a.db) as session:
            row = session.execute(select(Spend).where(Spend.scope == "key:team")).scalar_one()
            assert row.spent_usd <= limit and row.reserved_usd == pytest.approx(0.0, abs=1e-12)
            assert row.spent_usd == pytest.approx(calls * 100 / 1e6)
            spent = session.execute(select(func.sum(DecisionRow.cost_usd)).where(DecisionRow.tenant == "team")).scalar()
            assert spent <= limit
            pacing = session.execute(select(Spend).where(Spend.scope == "pacing")).scalar_one()
            assert pacing.settled == calls and pacing.reserved_usd == pytest.approx(0.0, abs=1e-12)
        for service in (a, b):
            await service.follower.sync()
            assert service.engine.pacer.queries == calls  # every replica paces on every answer
            stats = await service.stats()
            assert stats["tenant_spend"]["team"]["spent_usd"] == pytest.approx(calls * 100 / 1e6)
    finally:
        for service in (a, b):
            await service.close()


async def test_rate_limit_is_one_bucket_across_replicas(tmp_path, pg_url, embedder, fakes):
    from router.api.auth import Authenticator, Principal

    configs = [replica_config(tmp_path, pg_url, fakes, f"r{i}", budget_auth(1.0, requests_per_minute=60, burst=4)) for i in (1, 2)]
    services = [RouterService(load_config(path, environ={}), embedder=embedder) for path in configs]
    try:
        guards = []
        for service in services:
            guard = Authenticator(service.config.auth, "127.0.0.1", {})
            guard.shared_buckets = service.take_rate_token
            guards.append(guard)
        team = Principal("team", "client", "team")
        admitted = 0
        for i in range(10):
            with contextlib.suppress(TooManyRequests):
                await guards[i % 2].admit(team)
                admitted += 1
        assert admitted == 4
        with pytest.raises(TooManyRequests) as refused:
            await guards[0].admit(team)
        assert refused.value.headers["Retry-After"] == "1"
    finally:
        for service in services:
            await service.close()


async def test_one_snapshot_writer_and_predictor_swaps_reach_every_replica(tmp_path, pg_url, embedder, fakes):
    extra = "[answers]\nstore = true\n[predictors]\nschedule = \"off\"\n"
    a = await start_replica(replica_config(tmp_path, pg_url, fakes, "r1", extra, cluster="model_poll_s = 3600\n"), embedder)
    b = await start_replica(replica_config(tmp_path, pg_url, fakes, "r2", extra, cluster="model_poll_s = 3600\n"), embedder)
    try:
        _, routed = await a.chat(chat_request("Say hi.", max_tokens=4))
        await b.feedback(routed.decision_id, None, reward=1.0)
        await a.follower.sync()
        written = await asyncio.gather(a.save_snapshot(), b.save_snapshot())
        assert sorted(written) == [False, True], "one replica writes, the other finds it done (or the lock taken)"
        reloads = []
        b.predictors.reload = lambda: reloads.append(1) or {}  # type: ignore[method-assign]
        from router.cluster import notify

        await asyncio.to_thread(notify, a.db, a._models_channel)
        for _ in range(100):
            if reloads:
                break
            await asyncio.sleep(0.05)
        assert reloads, "a promoted model is announced to every replica"
    finally:
        for service in (a, b):
            await service.close()


class CuttableProxy:
    """A TCP proxy on loopback to PostgreSQL that the test cuts (every connection dropped, new ones
    refused, as when the database goes away) and restores: a database outage that disturbs no one else."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.restore()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self._writers |= {client_writer, server_writer}
        await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer))
        self._writers -= {client_writer, server_writer}

    def restore(self) -> None:
        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

        self._call(start())

    def cut(self) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self._call(stop())

    def close(self) -> None:
        async def finish() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(finish())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def pg_proxy(pg_url):
    """(the proxy, the test schema's URL through it); closed after the routers that use it."""
    from sqlalchemy.engine import make_url

    real = make_url(normalise_url(pg_url))
    proxy = CuttableProxy(real.host or "127.0.0.1", real.port or 5432)
    yield proxy, pg_url.replace(f"{real.host}:{real.port}", f"127.0.0.1:{proxy.port}")
    proxy.close()


async def test_a_database_outage_is_a_503_and_every_replica_recovers(tmp_path, pg_url, pg_proxy, embedder, fakes, start_router):
    """Two replicas reach PostgreSQL through a proxy the test cuts for a few seconds under load: requests
    get 503 with Retry-After and a message naming the database (never a 500), `database_ok` is false
    while it lasts, both recover once it is back, every acknowledged reward is in the database, and
    both replicas have learned exactly the rewards the database holds."""
    proxy, proxied = pg_proxy
    servers = [start_router(replica_config(tmp_path, proxied, fakes, f"r{i}")) for i in (1, 2)]
    acked: dict[str, float] = {}
    statuses: list[int] = []
    outage_answers: list[httpx.Response] = []
    stop = asyncio.Event()

    async def client(worker: int) -> None:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            i = 0
            while not stop.is_set():
                i += 1
                first, second = servers[(worker + i) % 2], servers[(worker + i + 1) % 2]
                body = {"model": "auto", "messages": [{"role": "user", "content": f"{QUERIES[i % len(QUERIES)]} w{worker} {i}"}],
                        "max_tokens": 4}
                response = await http.post(f"{first.url}/v1/route", json=body)
                statuses.append(response.status_code)
                if response.status_code != 200:
                    outage_answers.append(response)
                    await asyncio.sleep(0.1)
                    continue
                decision = response.json()["router"]["decision_id"]
                reward = (i % 5) / 4
                for _ in range(100):  # a reward is retried until acknowledged (idempotent: a duplicate is fine)
                    answer = await http.post(f"{second.url}/v1/rewards", json={"decision_id": decision, "reward": reward})
                    statuses.append(answer.status_code)
                    if answer.status_code == 200:
                        acked[decision] = reward
                        break
                    outage_answers.append(answer)
                    await asyncio.sleep(0.2)

    try:
        workers = [asyncio.create_task(client(w)) for w in range(4)]
        await asyncio.sleep(2.0)
        before = len(acked)
        proxy.cut()
        await asyncio.sleep(3.0)
        assert all(not server.service.database_ok for server in servers), "readiness must be false while the database is away"
        proxy.restore()
        for _ in range(100):
            if all(server.service.database_ok for server in servers):
                break
            await asyncio.sleep(0.1)
        assert all(server.service.database_ok for server in servers), "every replica recovers"
        after = len(acked)
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*workers)
        assert len(acked) > after >= before > 0, (before, after, len(acked))
    finally:
        stop.set()

    assert 500 not in statuses
    assert outage_answers, "the outage was seen by the clients"
    for answer in outage_answers:
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["type"] == "database_unavailable" and "database" in error["message"], error
        assert int(answer.headers["Retry-After"]) >= 1
    direct = create_engine(normalise_url(pg_url))
    with Session(direct) as session:
        stored = dict(session.execute(select(Reward.decision_id, Reward.reward)).all())
    direct.dispose()
    assert acked.items() <= stored.items(), "every acknowledged reward is in the database"
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        learned = [sum(arm["feedback"] for arm in server.service.policies["thompson"].stats()["arms"].values()) for server in servers]
        if learned == [len(stored)] * 2:
            break
        await asyncio.sleep(0.2)
    assert learned == [len(stored)] * 2, (learned, len(stored))


async def test_a_training_run_needs_the_lease(tmp_path, sqlite_url, fakes):
    """The scheduler runs the job only while holding the lease; without it there is no run at all."""
    from router.training import TrainingScheduler

    config = load_config(write_config(tmp_path / "t.toml", sqlite_url, _backends(fakes), '[predictors]\nschedule = "off"\n'), environ={})
    asked: list[str] = []

    @contextlib.asynccontextmanager
    async def taken_elsewhere(trigger: str):
        asked.append(trigger)
        yield False

    scheduler = TrainingScheduler(config, lambda runs: None, lease=taken_elsewhere)
    try:
        assert await scheduler.run("api") == [] and asked == ["api"]
    finally:
        scheduler.shutdown()
