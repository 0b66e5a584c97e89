"""The pool with its breakers, against real HTTP servers on loopback that the test turns up and down."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from backends.breaker import BreakerSettings
from backends.client import BackendError, BackendSpec
from backends.pool import BackendPool
from tests.conftest import free_port
from tests.fake_backend import FakeVLLM


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def servers() -> Iterator[dict[str, FakeVLLM]]:
    started = {"a": FakeVLLM("model-a"), "b": FakeVLLM("model-b")}
    yield started
    for server in started.values():
        server.close()


def _spec(name: str, port: int, model: str | None = None, timeout_s: float = 5.0) -> BackendSpec:
    return BackendSpec(name, f"http://127.0.0.1:{port}", model or f"model-{name}", 0.5, 1.5, timeout_s=timeout_s)


@pytest.fixture
async def pool(servers) -> Any:
    clock = Clock()
    specs = [_spec(name, server.port) for name, server in servers.items()]
    backend_pool = BackendPool(specs, httpx.AsyncClient(), BreakerSettings(open_s=5.0, max_open_s=60.0), clock=clock)
    backend_pool.clock = clock  # the test's handle on time
    yield backend_pool
    await backend_pool.close()


def _eligible(pool: BackendPool) -> list[str]:
    return [s.spec.name for s in pool.eligible()]


async def _request(pool: BackendPool, order: list[str]) -> tuple[str | None, list[str]]:
    """One request the way the engine sends it: acquire, call, then exactly one verdict or release."""
    failed: list[str] = []
    for name in order:
        if not pool.acquire(name):
            continue
        try:
            await pool.state(name).client.chat({"messages": [{"role": "user", "content": "Hi"}]})
        except BackendError as error:
            if error.retryable:
                pool.record_failure(name, str(error))
                failed.append(name)
                continue
            pool.record_success(name)
            raise
        except BaseException:
            pool.release(name)
            raise
        pool.record_success(name)
        return name, failed
    return None, failed


async def test_unchecked_backends_are_eligible_and_closed(pool):
    assert _eligible(pool) == ["a", "b"]
    await pool.check_all(timeout_s=2)
    assert all(pool.state(n).healthy for n in ("a", "b"))
    assert _eligible(pool) == ["a", "b"]
    described = {b["name"]: b for b in pool.describe()}
    assert described["a"]["breaker"]["state"] == "closed" and described["a"]["failures"] == 0
    assert described["a"]["queue"]["num_requests_running"] == 1.0


async def test_a_failed_request_opens_then_one_probe_after_open_s(pool):
    assert pool.acquire("a")
    pool.record_failure("a", "backend a: unreachable (ConnectError: refused)")
    assert _eligible(pool) == ["b"] and not pool.acquire("a")
    assert pool.state("a").failures == 1 and pool.state("a").healthy is None  # health is the checks' word
    pool.clock.now += 5.0
    assert _eligible(pool) == ["a", "b"] and _eligible(pool) == ["a", "b"]  # eligible() takes no slot
    assert pool.acquire("a")  # the probe
    assert not pool.acquire("a") and _eligible(pool) == ["b"]  # a second request skips it
    pool.record_success("a")
    assert pool.state("a").breaker.state == "closed" and _eligible(pool) == ["a", "b"]
    assert pool.acquire("a") and pool.acquire("a")


async def test_release_frees_the_probe(pool):
    pool.record_failure("a", "backend a: timed out after 5s")
    pool.clock.now += 5.0
    assert pool.acquire("a") and not pool.acquire("a")
    pool.release("a")
    assert _eligible(pool) == ["a", "b"] and pool.acquire("a")


async def test_failed_health_check_opens_and_recovery_goes_half_open_then_closed(pool, servers):
    await pool.check_all(timeout_s=2)
    servers["a"].health_status = 500
    await pool.check_all(timeout_s=2)
    a = pool.state("a")
    assert a.healthy is False and "HTTP 500" in a.last_error
    assert a.breaker.state == "open" and _eligible(pool) == ["b"] and not pool.acquire("a")
    assert a.failures == 0 and a.breaker.failures_by_kind == {"health": 1}

    servers["a"].health_status = 200
    pool.clock.now += 2.0
    await pool.check_all(timeout_s=2)
    assert a.healthy is True and a.breaker.state == "open"  # a passed check does not close it early
    assert _eligible(pool) == ["b"]

    pool.clock.now += 3.0
    await pool.check_all(timeout_s=2)
    assert a.breaker.state == "half_open" and _eligible(pool) == ["a", "b"]
    assert pool.acquire("a")
    pool.record_success("a")
    assert a.breaker.state == "closed"
    described = {b["name"]: b for b in pool.describe()}["a"]["breaker"]
    assert described["state"] == "closed" and described["failures"] == 1 and described["times_opened"] == 1


async def test_unreachable_backend_is_open_after_the_first_check(servers):
    dead = _spec("dead", free_port())
    live = _spec("a", servers["a"].port)
    pool = BackendPool([dead, live], httpx.AsyncClient())
    try:
        await pool.check_all(timeout_s=1)
        assert _eligible(pool) == ["a"]
        breaker = pool.describe()[0]["breaker"]
        assert breaker["state"] == "open" and 0 < breaker["retry_in_s"] <= 5.0
        assert "ConnectError" in breaker["last_error"] and breaker["failures_by_kind"] == {"health": 1}
    finally:
        await pool.close()


async def test_with_one_of_two_down_requests_succeed_and_pay_one_failure(pool, servers):
    servers["a"].chat_status = 503  # /health still answers 200: only real requests find it broken
    await pool.check_all(timeout_s=2)
    results = [await _request(pool, ["a", "b"]) for _ in range(10)]
    assert all(served == "b" for served, _ in results)
    assert [failed for _, failed in results].count(["a"]) == 1 and servers["a"].chats == 1

    pool.clock.now += 5.0  # one probe, which fails: the period doubles
    assert await _request(pool, ["a", "b"]) == ("b", ["a"])
    await pool.check_all(timeout_s=2)  # healthy all along: no forgiveness
    assert pool.state("a").breaker.open_period_s == 10.0
    pool.clock.now += 5.0
    assert await _request(pool, ["a", "b"]) == ("b", [])

    servers["a"].chat_status = 200
    pool.clock.now += 5.0
    assert await _request(pool, ["a", "b"]) == ("a", [])  # the probe succeeds
    assert pool.state("a").breaker.state == "closed" and await _request(pool, ["a", "b"]) == ("a", [])
    a = pool.state("a")
    assert a.failures == 2 and a.breaker.failures_by_kind == {"http_5xx": 2} and "HTTP 503" in a.last_error


async def test_a_client_error_is_not_a_backend_failure(pool, servers):
    servers["a"].chat_status = 400
    with pytest.raises(BackendError):
        await _request(pool, ["a", "b"])
    assert pool.state("a").breaker.state == "closed" and pool.state("a").failures == 0


async def test_a_cancelled_probe_gives_the_slot_back(pool, servers):
    pool.record_failure("a", "backend a: timed out after 5s")
    pool.clock.now += 5.0
    servers["a"].chat_delay_s = 10.0
    task = asyncio.create_task(_request(pool, ["a"]))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if servers["a"].chats:
            break
    assert not pool.acquire("a")  # the probe is out
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.state("a").breaker.state == "half_open" and pool.acquire("a")

