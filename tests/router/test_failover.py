"""Failover over HTTP: a hung backend costs one timeout before its breaker opens; a stream cut in the
middle reaches the client as an SSE error event. The broken backends are fakes (a real vLLM cannot be
made to hang or die mid-answer on demand); the healthy one is a real vLLM."""

import json
import time

import httpx
import pytest
from sqlmodel import Session, select

from router.tables import DecisionRow
from tests.conftest import backend_table, write_config
from tests.fake_backend import FakeVLLM

pytestmark = pytest.mark.vllm


@pytest.fixture
def fake():
    server = FakeVLLM("broken")
    yield server
    server.close()


def _config(tmp_path, url, vllm_port, fake_port, breaker="open_s = 60\nmax_open_s = 120"):
    backends = backend_table("smol-a", vllm_port, 0.50, 1.50) + backend_table("broken", fake_port, 0.05, 0.10, timeout_s=1.0)
    extra = f'policies = ["random"]\ndefault_policy = "random"\n[breaker]\n{breaker}\n'
    return write_config(tmp_path / "router.toml", url, backends, extra, health_interval_s=600)


def _chat(**extra):
    return {"model": "auto", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, **extra}


def test_one_of_two_backends_hung_costs_one_timeout_then_the_breaker_opens(tmp_path, sqlite_url, vllm_backends, start_router, fake):
    router = start_router(_config(tmp_path, sqlite_url, vllm_backends["smol-a"], fake.port))
    fake.chat_delay_s = 30  # answers health checks, never answers a chat within the 1 s timeout
    infos = []
    for _ in range(12):
        response = httpx.post(f"{router.url}/v1/chat/completions", json=_chat(), timeout=60)
        assert response.status_code == 200, response.text
        infos.append(response.json()["router"])
    assert all(info["backend"] == "smol-a" for info in infos)
    assert sum("broken" in info["failed_backends"] for info in infos) >= 1
    assert fake.chats == 1  # one request paid the timeout; after it the breaker kept traffic away
    stats = router.service.pool.state("broken").breaker.describe()
    assert stats["state"] == "open" and stats["failures_by_kind"] == {"timeout": 1}
    with Session(router.service.db) as session:
        failed = [d.failed_backends for d in session.exec(select(DecisionRow)).all() if d.failed_backends]
    reasons = [f["reason"] for row in failed for f in row]
    assert any("timed out" in r or "timeout" in r.lower() for r in reasons), reasons
    assert all(r == "circuit breaker open" for r in reasons[1:]) or len(reasons) == 1


def test_half_open_probe_brings_a_recovered_backend_back(tmp_path, sqlite_url, vllm_backends, start_router, fake):
    router = start_router(_config(tmp_path, sqlite_url, vllm_backends["smol-a"], fake.port, "open_s = 0.5\nmax_open_s = 1"))
    fake.chat_status = 500
    assert httpx.post(f"{router.url}/v1/chat/completions", json=_chat(model="broken"), timeout=60).status_code == 502
    assert router.service.pool.state("broken").breaker.state == "open"
    fake.chat_status = 200
    time.sleep(0.6)
    assert router.service.pool.state("broken").breaker.state == "half_open"
    for _ in range(20):  # the random policy reaches the probe soon
        info = httpx.post(f"{router.url}/v1/chat/completions", json=_chat(), timeout=60).json()["router"]
        if info["backend"] == "broken":
            break
    assert info["backend"] == "broken" and router.service.pool.state("broken").breaker.state == "closed"


def test_a_stream_cut_midway_ends_with_an_sse_error_event(tmp_path, sqlite_url, vllm_backends, start_router, fake):
    router = start_router(_config(tmp_path, sqlite_url, vllm_backends["smol-a"], fake.port))
    fake.cut_streams = True
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=_chat(model="broken", stream=True), timeout=30) as response:
        assert response.status_code == 200
        text = response.read().decode()
    events = [block for block in text.split("\n\n") if block.strip()]
    first = json.loads(events[0].removeprefix("data: "))
    assert first["choices"][0]["delta"]["content"] == "Once"
    assert events[-1].startswith("event: error")
    error = json.loads(events[-1].split("data: ", 1)[1])["error"]
    assert error["type"] == "backend_error" and "before [DONE]" in error["message"]
    assert "data: [DONE]" not in text
    decision_id = response.headers["X-Router-Decision-Id"]
    for _ in range(50):  # the decision is finished in the background once the stream ended
        with Session(router.service.db) as session:
            row = session.get(DecisionRow, decision_id)
        if row.status != "routed":
            break
        time.sleep(0.05)
    assert row.status == "error" and "before [DONE]" in row.error
