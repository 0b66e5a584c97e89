"""Bounded load through the real service (bench/load.py's loop): nothing fails, nothing is lost.

300 `/v1/route` decisions at concurrency 16, then a reward for each at concurrency 16, against the
router in a thread with the real vLLM backends and PostgreSQL. Every decision and reward acknowledged
must be in the database, and the statistics must count exactly them. No timing assertions: speed is
bench/'s business.

This module also holds the one place the load, durability and fuzz tests build their router config
and API keys (`router_config`, `ADMIN`, `CLIENT`, `headers`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from bench.load import auth_headers, reward_for, run_load
from policies import registry
from router.db import normalise_url
from router.tables import DecisionRow, Reward
from tests.conftest import backend_table, write_config

pytestmark = [pytest.mark.vllm, pytest.mark.postgres]

ADMIN = "test-admin-key-0123456789"
CLIENT = "test-client-key-0123456789"


def headers(key: str = ADMIN) -> dict[str, str]:
    return auth_headers(key)


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def router_config(
    path: Path,
    database_url: str,
    ports: dict[str, int],
    *,
    top: str = "",
    max_tokens: int | None = None,
    health_interval_s: float = 1.0,
    timeout_s: float = 60.0,
) -> Path:
    """smol-a (cheap) and smol-b (dear), every registered policy, an admin and a client key.

    `top`: more top-level settings (e.g. `snapshot_every = 20`).
    """
    backends = backend_table("smol-a", ports["smol-a"], 0.05, 0.10, timeout_s) + backend_table("smol-b", ports["smol-b"], 0.50, 1.50, timeout_s)
    lines = ["policies = [" + ", ".join(f'"{p}"' for p in registry.names()) + "]", top]
    lines += [
        "[auth]", "open_on_loopback = false",
        "[[auth.keys]]", 'name = "ops"', 'role = "admin"', f'key_sha256 = "{_sha(ADMIN)}"',
        "[[auth.keys]]", 'name = "tenant-a"', 'role = "client"', f'key_sha256 = "{_sha(CLIENT)}"',
    ]
    if max_tokens is not None:
        lines += ["[limits]", f"max_tokens = {max_tokens}"]
    return write_config(path, database_url, backends, "\n".join(lines) + "\n", health_interval_s)


def database_rows(url: str) -> tuple[dict[str, str], dict[str, float]]:
    """(decision id -> kind, decision id -> reward) read straight from the database."""
    engine = create_engine(normalise_url(url))
    try:
        with engine.connect() as connection:
            decisions = dict(connection.execute(select(DecisionRow.id, DecisionRow.kind)).all())
            rewards = {d: float(r) for d, r in connection.execute(select(Reward.decision_id, Reward.reward)).all()}
            assert connection.execute(select(func.count()).select_from(Reward)).scalar_one() == len(rewards)
    finally:
        engine.dispose()
    return decisions, rewards


def learned_counts(stats: dict) -> dict[str, tuple[int, int]]:
    """Per policy: (rewards its arm tallies learned from, rewards its shadow estimate counted)."""
    return {
        name: (sum(arm["feedback"] for arm in entry["arms"].values()), entry["shadow"]["rewards"])
        for name, entry in stats["policies"].items()
    }


async def test_route_and_reward_load_loses_nothing(tmp_path, pg_url, vllm_backends, start_router):
    import httpx

    router = start_router(router_config(tmp_path / "router.toml", pg_url, vllm_backends))

    routed = await run_load(router.url, 300, 16, "route", CLIENT)
    assert routed.summary()["errors"] == {}, routed.summary()
    assert routed.ok == 300 and len(set(routed.decision_ids)) == 300

    rewarded = await run_load(router.url, 0, 16, "rewards", CLIENT, decision_ids=routed.decision_ids)
    assert rewarded.summary()["errors"] == {}, rewarded.summary()
    assert rewarded.ok == 300 and rewarded.duplicates == 0
    assert rewarded.rewarded == {d: reward_for(d) for d in routed.decision_ids}

    decisions, rewards = database_rows(pg_url)
    assert decisions == {d: "route" for d in routed.decision_ids}
    assert rewards == pytest.approx(rewarded.rewarded)

    stats = httpx.get(f"{router.url}/v1/policies/stats", headers=headers(), timeout=30).json()
    assert sum(b["decisions"] for b in stats["backends"].values()) == 300
    assert sum(b["rewards"] for b in stats["backends"].values()) == 300
    assert sum(b["mean_reward"] * b["rewards"] for b in stats["backends"].values() if b["rewards"]) == pytest.approx(sum(rewards.values()))
    made = {name: sum(t["decisions"] for t in entry["decisions"].values()) for name, entry in stats["policies"].items()}
    assert made == {name: (300 if name == stats["active_policy"] else 0) for name in stats["policies"]}
    assert learned_counts(stats) == {name: (300, 300) for name in stats["policies"]}
    assert stats["memory_queries"] == 300

    again = await run_load(router.url, 0, 16, "rewards", CLIENT, decision_ids=routed.decision_ids[:50])
    assert again.summary()["errors"] == {} and again.duplicates == 50
    assert database_rows(pg_url)[1] == pytest.approx(rewarded.rewarded)
