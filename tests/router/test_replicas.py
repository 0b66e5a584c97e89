"""Three `llm-router serve` processes sharing one PostgreSQL schema, behind a real HAProxy.

One cluster for the module (starting replicas is the slow part), used in order:
1. decisions and rewards round-robin through the balancer: every replica's statistics agree, and the
   same query gets the same policy scores from each replica, within the documented lag;
2. a key with a budget for N calls hammered concurrently through the balancer: at most N are answered,
   the recorded spend never passes the limit;
3. training triggered on every replica at once runs once;
4. `kill -9` of one replica while rewards flow: the balancer stops sending to it, the others keep
   serving, no acknowledged reward is lost, and the restarted replica catches up.

The backend is the fake OpenAI-compatible server (tests/fake_backend.py); the balancer is Debian's
`haproxy` (`.ci/run` installs it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlmodel import Session

from router.db import normalise_url
from router.tables import DecisionRow, Reward, Spend, TrainingRun
from tests.conftest import PG_URL, RouterProcess, backend_table, free_port, unavailable
from tests.fake_backend import FakeVLLM

pytestmark = pytest.mark.postgres

ADMIN, CLIENT = "replicas-admin-key-0123456789", "replicas-client-key-0123456789"
CALLS = 8  # the client key's budget, in calls
PRICE_OUT = 100.0  # $ per million output tokens of the one backend; no input price: a 1-token answer costs exactly its worst case
LIMIT_USD = CALLS * PRICE_OUT / 1e6 + 1e-9
LAG_BOUND_S = 5.0  # generous over the documented bound (cluster.poll_interval_s, notifications in milliseconds), on a busy 2-core machine
QUERIES = [
    "What is the capital of France?", "Prove that sqrt(2) is irrational.", "Write a haiku about rain.", "Sort a list in Python.",
    "Explain TCP slow start.", "How many legs has a spider?", "What is 17 * 23?", "Summarise the plot of Hamlet.",
]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Replica(RouterProcess):
    """One replica of the cluster: its own name (its replica id), the shared database."""

    def __init__(self, name: str, config: Path, database_url: str, log_dir: Path) -> None:
        super().__init__(config, log_dir / f"{name}.log", {"DATABASE_URL": database_url, "LLM_ROUTER_CLUSTER__REPLICA_ID": name}, name)

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/v1/policies/stats", headers=auth(ADMIN), timeout=30)
        assert response.status_code == 200, response.text
        return response.json()


class HAProxy:
    """Debian's haproxy in the foreground with a generated config: round robin over the replicas, health
    checks every 300 ms (down after 2 failures), a request whose connection fails goes to another replica."""

    def __init__(self, replicas: list[Replica], directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket = directory / "haproxy.sock"
        servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check" for r in replicas)
        self.config = directory / "haproxy.cfg"
        self.config.write_text(f"""global
    maxconn 1024
    stats socket {self.socket} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1
    retry-on conn-failure
frontend routers
    bind 127.0.0.1:{self.port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    default-server inter 300ms fall 2 rise 2
{servers}
""")
        self.log = directory / "haproxy.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(["haproxy", "-f", str(self.config), "-db"], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` of the backend's servers: name -> its CSV fields (status, stot, ...)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.socket))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        lines = data.decode().strip().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
        return {row["svname"]: row for row in rows if row["pxname"] == "replicas" and row["svname"] not in ("BACKEND", "FRONTEND")}

    def wait_status(self, name: str, status: str, timeout_s: float = 20.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                if self.servers()[name]["status"].startswith(status):
                    return time.monotonic() - started
            except (OSError, KeyError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"haproxy: {name} not {status} after {timeout_s:g}s: {self.servers().get(name)}\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Cluster:
    def __init__(self, replicas: list[Replica], balancer: HAProxy, database_url: str) -> None:
        self.replicas, self.balancer, self.database_url = replicas, balancer, database_url
        self.db = create_engine(normalise_url(database_url))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if shutil.which("haproxy") is None:
        unavailable("haproxy not installed (apt-get install -y haproxy; .ci/run installs it)")
    admin = create_engine(normalise_url(PG_URL))
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001 - no server: not available
        admin.dispose()
        unavailable(f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}")
    url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    directory = tmp_path_factory.mktemp("replicas")
    backend = FakeVLLM("cheap")
    config = directory / "router.toml"
    config.write_text(f"""seed = 7
policies = ["thompson", "qlearning", "vw", "elo", "gradient", "random"]
snapshot_every = 10
[health]
interval_s = 1.0
[cluster]
enabled = true
poll_interval_s = 0.5
[answers]
store = true
[predictors]
schedule = "off"
min_samples = 100000
artifacts_dir = "{directory / 'predictors'}"
[auth]
open_on_loopback = false
[[auth.keys]]
name = "ops"
role = "admin"
key_env = "REPLICAS_ADMIN_KEY"
[[auth.keys]]
name = "team"
role = "client"
key_env = "REPLICAS_CLIENT_KEY"
max_spend_usd = {LIMIT_USD!r}
{backend_table("cheap", backend.port, 0.0, PRICE_OUT)}""")
    os.environ["REPLICAS_ADMIN_KEY"], os.environ["REPLICAS_CLIENT_KEY"] = ADMIN, CLIENT
    replicas = [Replica(f"r{i}", config, url, directory) for i in (1, 2, 3)]
    balancer = None
    try:
        for replica in replicas:
            replica.launch()
        for replica in replicas:
            replica.wait_ready()
        balancer = HAProxy(replicas, directory)
        for replica in replicas:
            balancer.wait_status(replica.name, "UP")
        yield Cluster(replicas, balancer, url)
    finally:
        if balancer is not None:
            balancer.stop()
        for replica in replicas:
            replica.stop()
        backend.close()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def agreeing(stats: dict[str, Any]) -> dict[str, Any]:
    """What every replica must agree on: learning, estimates, pacing, memory, the log's tallies (not its own
    pulls, in-flight calls, breakers or replica name)."""
    policies = {}
    for name, policy in stats["policies"].items():
        internals = {k: v for k, v in (policy.get("internals") or {}).items() if k != "arguments"}
        policies[name] = {"arms": {a: {k: v for k, v in arm.items() if k != "pulls"} for a, arm in policy["arms"].items()},
                          "internals": internals, "shadow": policy["shadow"], "decisions": policy["decisions"]}
    budget = {k: stats["budget"][k] for k in ("lambda", "spent_usd", "queries", "recent_mean_cost_usd")}
    return {"policies": policies, "backends": stats["backends"], "budget": budget, "memory": stats["memory_queries"],
            "lengths": stats["expected_output_tokens"], "tenant_spend": stats["tenant_spend"]}


def converge(replicas: list[Replica], timeout_s: float = LAG_BOUND_S) -> tuple[list[dict[str, Any]], float]:
    """Every replica at the log's head and agreeing; returns their stats and how long it took."""
    started = time.monotonic()
    while True:
        stats = [replica.stats() for replica in replicas]
        heads = {s["cluster"]["lag"]["head_seq"] for s in stats}
        applied = {s["cluster"]["lag"]["applied_seq"] for s in stats}
        if len(applied) == 1 and applied <= heads and all(agreeing(s) == agreeing(stats[0]) for s in stats):
            return stats, time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            return stats, time.monotonic() - started
        time.sleep(0.1)


async def _concurrently(count: int, concurrency: int, one: Any) -> list[Any]:
    queue = list(range(count))
    results: list[Any] = [None] * count

    async def worker() -> None:
        while queue:
            index = queue.pop(0)
            results[index] = await one(index)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def test_round_robin_learning_agrees_on_every_replica(cluster: Cluster) -> None:
    url = cluster.balancer.url

    async def run() -> list[str]:
        async with httpx.AsyncClient(headers=auth(ADMIN), timeout=60, trust_env=False) as http:
            async def decide(i: int) -> str:
                body = {"model": "auto", "messages": [{"role": "user", "content": f"{QUERIES[i % len(QUERIES)]} ({i})"}], "max_tokens": 16}
                response = await http.post(f"{url}/v1/route", json=body)
                assert response.status_code == 200, response.text
                return response.json()["router"]["decision_id"]

            decisions = await _concurrently(60, 8, decide)

            async def reward(i: int) -> None:
                response = await http.post(f"{url}/v1/rewards", json={"decision_id": decisions[i], "reward": (i % 5) / 4})
                assert response.status_code == 200, response.text

            await _concurrently(60, 8, reward)
            return decisions

    decisions = asyncio.run(run())
    stats, took = converge(cluster.replicas)
    assert all(agreeing(s) == agreeing(stats[0]) for s in stats), "replicas disagree after the documented lag"
    assert took < LAG_BOUND_S
    served = {s["cluster"]["replica"]: s["policies"]["thompson"]["arms"]["cheap"]["pulls"] for s in stats}
    assert all(pulls > 0 for pulls in served.values()), f"the balancer spread the decisions: {served}"
    assert sum(arm["feedback"] for arm in stats[0]["policies"]["thompson"]["arms"].values()) == len(decisions)
    assert stats[0]["memory_queries"] == len(decisions)
    for s in stats:
        lag = s["cluster"]["lag"]
        assert lag["propagation_ms"]["samples"] > 0 and lag["apply_errors"] == 0
    # The same query asked of each replica directly: the same scores from every policy that scores without neighbours.
    for policy in ("thompson", "qlearning", "gradient", "vw"):
        scores = []
        for replica in cluster.replicas:
            body = {"model": "auto", "messages": [{"role": "user", "content": "What is the capital of Spain?"}], "max_tokens": 16,
                    "router": {"policy": policy}}
            response = httpx.post(f"{replica.url}/v1/route", json=body, headers=auth(ADMIN), timeout=30)
            assert response.status_code == 200, response.text
            scores.append(response.json()["router"]["scores"])
        assert scores[0] == scores[1] == scores[2], (policy, scores)


def test_a_budget_for_n_calls_holds_across_replicas(cluster: Cluster) -> None:
    url = cluster.balancer.url

    async def run() -> list[int]:
        async with httpx.AsyncClient(headers=auth(CLIENT), timeout=60, trust_env=False) as http:
            async def call(i: int) -> int:
                body = {"model": "cheap", "messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 1}
                response = await http.post(f"{url}/v1/chat/completions", json=body)
                if response.status_code == 429:
                    error = response.json()["error"]
                    assert error["type"] == "insufficient_quota" and "team" in error["message"], error
                    assert "Retry-After" not in response.headers or int(response.headers["Retry-After"]) >= 1
                else:
                    assert response.status_code == 200, response.text
                return response.status_code

            return await _concurrently(5 * CALLS, 16, call)

    statuses = asyncio.run(run())
    assert statuses.count(200) == CALLS and statuses.count(429) == 4 * CALLS, statuses
    deadline = time.monotonic() + 10
    while True:  # each answer's settling write follows it out: the reservations clear just after
        with Session(cluster.db) as session:
            row = session.execute(select(Spend).where(Spend.scope == "key:team")).scalar_one()
        assert row.spent_usd + row.reserved_usd <= LIMIT_USD
        if abs(row.reserved_usd) < 1e-12 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert row.spent_usd <= LIMIT_USD and abs(row.reserved_usd) < 1e-12
    with Session(cluster.db) as session:
        spent = session.execute(select(func.sum(DecisionRow.cost_usd)).where(DecisionRow.tenant == "team")).scalar()
        assert spent <= LIMIT_USD
    stats, _ = converge(cluster.replicas)
    assert {round(s["tenant_spend"]["team"]["spent_usd"], 12) for s in stats} == {round(CALLS * PRICE_OUT / 1e6, 12)}


def test_training_triggered_on_every_replica_runs_once(cluster: Cluster) -> None:
    from router.predictors import KINDS

    with Session(cluster.db) as session:
        before = session.execute(select(func.count()).select_from(TrainingRun)).scalar_one()

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=auth(ADMIN), timeout=300, trust_env=False) as http:
            return await asyncio.gather(*(http.post(f"{r.url}/v1/predictors/train") for r in cluster.replicas))

    answers = asyncio.run(run())
    assert sorted(a.status_code for a in answers) == [200, 409, 409], [a.text for a in answers]
    trained = next(a for a in answers if a.status_code == 200).json()["runs"]
    assert sorted(run["kind"] for run in trained) == sorted(KINDS)
    for answer in answers:
        if answer.status_code == 409:
            assert "another replica is training" in answer.json()["error"]["message"]
    with Session(cluster.db) as session:
        assert session.execute(select(func.count()).select_from(TrainingRun)).scalar_one() == before + len(KINDS)


def test_kill_9_mid_load_loses_no_acknowledged_reward_and_the_restart_catches_up(cluster: Cluster) -> None:
    url, balancer = cluster.balancer.url, cluster.balancer
    victim = cluster.replicas[1]
    acked: dict[str, float] = {}
    after_down: list[int] = []

    async def run() -> list[str]:
        async with httpx.AsyncClient(headers=auth(ADMIN), timeout=60, trust_env=False) as http:
            async def decide(i: int) -> str:
                body = {"model": "auto", "messages": [{"role": "user", "content": f"{QUERIES[i % len(QUERIES)]} [kill {i}]"}],
                        "max_tokens": 16}
                response = await http.post(f"{url}/v1/route", json=body)
                assert response.status_code == 200, response.text
                return response.json()["router"]["decision_id"]

            decisions = await _concurrently(90, 8, decide)
            down = asyncio.Event()

            async def killer() -> None:
                while len(acked) < 25:
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(victim.kill9)
                await asyncio.to_thread(balancer.wait_status, victim.name, "DOWN")
                down.set()

            async def reward(i: int) -> None:
                value = (i % 3) / 2
                for _ in range(50):  # no answer (killed in flight): try again; a duplicate answers 200 too
                    was_down = down.is_set()
                    try:
                        response = await http.post(f"{url}/v1/rewards", json={"decision_id": decisions[i], "reward": value})
                    except httpx.HTTPError:
                        await asyncio.sleep(0.1)
                        continue
                    if was_down:
                        after_down.append(response.status_code)
                    if response.status_code == 200:
                        acked[decisions[i]] = value
                        return
                    await asyncio.sleep(0.1)
                raise AssertionError(f"reward {i} never acknowledged")

            await asyncio.gather(killer(), _concurrently(90, 6, reward))
            # Rewards may all be acknowledged before the balancer marks the victim down: once it has, every
            # request (repeats here, answered 200 as duplicates) must reach a live replica.
            for decision_id, value in list(acked.items())[:12]:
                response = await http.post(f"{url}/v1/rewards", json={"decision_id": decision_id, "reward": value})
                after_down.append(response.status_code)
            return decisions

    decisions = asyncio.run(run())
    assert set(acked) == set(decisions)
    assert after_down and all(status == 200 for status in after_down), "once down, the balancer sends nothing to the dead replica"
    stot = balancer.servers()[victim.name]["stot"]
    alive = [r for r in cluster.replicas if r is not victim]
    with httpx.Client(headers=auth(ADMIN), timeout=30) as http:
        for i in range(6):
            body = {"model": "auto", "messages": [{"role": "user", "content": f"still serving {i}"}], "max_tokens": 16}
            assert http.post(f"{url}/v1/route", json=body).status_code == 200
    assert balancer.servers()[victim.name]["stot"] == stot
    with Session(cluster.db) as session:
        stored = dict(session.execute(select(Reward.decision_id, Reward.reward)).all())
    assert acked.items() <= stored.items(), "every acknowledged reward is in the database"

    victim.launch()
    victim.wait_ready()
    balancer.wait_status(victim.name, "UP")
    stats, took = converge(cluster.replicas)
    assert all(agreeing(s) == agreeing(stats[0]) for s in stats), "the restarted replica caught up"
    for s in stats:
        assert sum(arm["feedback"] for arm in s["policies"]["thompson"]["arms"].values()) == len(stored)
    assert alive
