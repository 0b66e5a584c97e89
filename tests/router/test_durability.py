"""kill -9 in the middle of reward ingestion loses no acknowledged reward, in the log or in the policies.

`llm-router serve` runs as its own process (the python serving process is the leader of a new session,
so SIGKILL to the group leaves nothing behind), against the real vLLM backends and a real database,
with `snapshot_every = 20` so snapshots are being written when it dies. Each cycle: decisions through
`POST /v1/route`, then rewards from concurrent clients; as soon as enough have been acknowledged, SIGKILL
while others are in flight. After each restart:

(a) every reward answered 2xx is in the `rewards` table with its value (read straight from the database);
(b) every policy has learned from every reward in the table, no more, no fewer: the `feedback` tallies of
    its arms and its shadow estimate's `rewards` both equal the table's row count (after the restart
    that state is the latest snapshot plus the replay of the rewards logged after it);
(c) rewards whose answer was lost in the kill are posted again: the ones the database had are answered
    as duplicates, the others are recorded now.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from bench.load import load_prompts, reward_for
from router.db import normalise_url
from router.tables import PolicySnapshot
from tests.conftest import RouterProcess
from tests.router.test_load import ADMIN, CLIENT, database_rows, headers, learned_counts, router_config

pytestmark = pytest.mark.vllm

DECISIONS_PER_CYCLE = 90
CLIENTS = 8
KILL_AFTER = (25, 45, 60)  # rewards acknowledged in a cycle before its SIGKILL, one per cycle
START_TIMEOUT_S = 120.0


class Serve(RouterProcess):
    """The router under test, ready once both vLLM backends are up."""

    def __init__(self, config: Path, log: Path) -> None:
        super().__init__(config, log)

    def start(self) -> None:
        self.launch()
        self.wait_ready(lambda response: len(response.json().get("backends_up", [])) == 2, headers(), START_TIMEOUT_S)


class Ledger:
    """What the clients know: decisions made, rewards acknowledged, rewards whose answer never came."""

    def __init__(self) -> None:
        self.decisions: list[str] = []
        self.acked: dict[str, float] = {}
        self.unknown: set[str] = set()  # posted, no answer (killed in flight): maybe recorded, maybe not
        self.duplicates: set[str] = set()

    def pending(self) -> list[str]:
        return [d for d in self.decisions if d not in self.acked]


async def _decide(url: str, ledger: Ledger, prompts: list[str], count: int) -> None:
    async with httpx.AsyncClient(headers=headers(CLIENT), timeout=60, trust_env=False) as client:
        queue = list(range(count))

        async def worker() -> None:
            while queue:
                index = queue.pop()
                body = {"model": "auto", "messages": [{"role": "user", "content": prompts[index % len(prompts)]}], "max_tokens": 16}
                response = await client.post(f"{url}/v1/route", json=body)
                assert response.status_code == 200, response.text
                ledger.decisions.append(response.json()["router"]["decision_id"])

        await asyncio.gather(*(worker() for _ in range(CLIENTS)))


async def _reward_until_killed(server: Serve, ledger: Ledger, kill_after: int | None) -> int:
    """Reward every pending decision from CLIENTS concurrent clients; SIGKILL once `kill_after` are
    acknowledged in this round (the other clients' requests are in flight then). Returns the acks."""
    todo = ledger.pending()
    random.Random(len(ledger.decisions)).shuffle(todo)
    acked = 0
    killed = False

    async def client_task() -> None:
        nonlocal acked, killed
        async with httpx.AsyncClient(headers=headers(CLIENT), timeout=30, trust_env=False) as client:
            while todo and not killed:
                decision_id = todo.pop()
                try:
                    response = await client.post(f"{server.url}/v1/rewards", json={"decision_id": decision_id, "reward": reward_for(decision_id)})
                except httpx.TransportError:
                    assert killed, f"reward for {decision_id} failed while the server was up:\n{server.tail()}"
                    ledger.unknown.add(decision_id)
                    continue
                assert response.status_code == 200, response.text
                ledger.acked[decision_id] = reward_for(decision_id)
                ledger.unknown.discard(decision_id)
                if response.json()["duplicate"]:
                    ledger.duplicates.add(decision_id)
                acked += 1
                if kill_after is not None and acked >= kill_after and not killed:
                    killed = True
                    server.kill9()

    await asyncio.gather(*(client_task() for _ in range(CLIENTS)))
    return acked


def _snapshot_rows(url: str) -> int:
    engine = create_engine(normalise_url(url))
    try:
        with engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(PolicySnapshot)).scalar_one()
    finally:
        engine.dispose()


def _check_after_restart(server: Serve, url: str, ledger: Ledger) -> dict[str, float]:
    decisions, rewards = database_rows(url)
    assert set(ledger.decisions) <= set(decisions), "an acknowledged decision is missing"
    lost = {d: v for d, v in ledger.acked.items() if d not in rewards}
    assert not lost, f"{len(lost)} acknowledged rewards lost: {sorted(lost)[:5]}"
    assert {d: rewards[d] for d in ledger.acked} == pytest.approx(ledger.acked)
    assert set(rewards) <= set(ledger.acked) | ledger.unknown, "a reward nobody posted is in the log"
    stats = httpx.get(f"{server.url}/v1/policies/stats", headers=headers(ADMIN), timeout=30).json()
    assert learned_counts(stats) == {name: (len(rewards), len(rewards)) for name in stats["policies"]}, server.tail()
    assert sum(b["rewards"] for b in stats["backends"].values()) == len(rewards)
    return rewards


@pytest.mark.parametrize("db", [pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"])
def test_sigkill_during_reward_load_loses_no_acknowledged_reward(db, request, tmp_path, vllm_backends):
    url = request.getfixturevalue("pg_url" if db == "postgresql" else "sqlite_url")
    config = router_config(tmp_path / "router.toml", url, vllm_backends, top="snapshot_every = 20")
    prompts = load_prompts()
    server = Serve(config, tmp_path / "router.log")
    ledger = Ledger()
    server.start()
    try:
        for cycle, kill_after in enumerate(KILL_AFTER):
            asyncio.run(_decide(server.url, ledger, prompts[cycle * 7:] + prompts[: cycle * 7], DECISIONS_PER_CYCLE))
            acked = asyncio.run(_reward_until_killed(server, ledger, kill_after))
            assert acked >= kill_after, f"cycle {cycle}: server died early:\n{server.tail()}"
            server.start()
            recorded = _check_after_restart(server, url, ledger)
            # (c) answers lost in the kill: posting again is a duplicate exactly when the log has it
            in_flight = sorted(ledger.unknown)
            asyncio.run(_retry(server, ledger, in_flight))
            assert {d for d in in_flight if d in ledger.duplicates} == {d for d in in_flight if d in recorded}
        assert _snapshot_rows(url) > 0, "no snapshot was written in any of the killed runs"
        asyncio.run(_reward_until_killed(server, ledger, None))  # the rest, no kill
        assert not ledger.pending()
        server.stop()
        assert server.process is not None and server.process.returncode == 0, server.tail()
        server.start()
        recorded = _check_after_restart(server, url, ledger)
        assert recorded.keys() == set(ledger.decisions)
    finally:
        server.stop()


async def _retry(server: Serve, ledger: Ledger, decision_ids: list[str]) -> None:
    async with httpx.AsyncClient(headers=headers(CLIENT), timeout=30, trust_env=False) as client:
        for decision_id in decision_ids:
            response = await client.post(f"{server.url}/v1/rewards", json={"decision_id": decision_id, "reward": reward_for(decision_id)})
            assert response.status_code == 200, response.text
            ledger.acked[decision_id] = reward_for(decision_id)
            ledger.unknown.discard(decision_id)
            if response.json()["duplicate"]:
                ledger.duplicates.add(decision_id)
