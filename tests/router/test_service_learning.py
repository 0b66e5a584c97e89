"""Learning and money in the service under failover and concurrency, against fake backends on loopback
(a real vLLM cannot be made to fail or to pause mid-answer on demand) and a real database."""

import asyncio

import pytest
from sqlmodel import Session

from router.config import load_config
from router.errors import TooManyRequests
from router.service import RouterService
from router.tables import DecisionRow
from tests.conftest import backend_table, chat_request, route, write_config
from tests.fake_backend import FakeVLLM


@pytest.fixture
def fakes():
    servers = {"down": FakeVLLM("down"), "up": FakeVLLM("up")}
    yield servers
    for server in servers.values():
        server.close()


def _service(tmp_path, url, embedder, fakes, extra="") -> RouterService:
    backends = backend_table("down", fakes["down"].port, 0.1, 0.2) + backend_table("up", fakes["up"].port, 1.0, 2.0)
    path = write_config(tmp_path / "router.toml", url, backends, extra, health_interval_s=600)
    return RouterService(load_config(path, environ={}), embedder=embedder)


FAILING_OVER = 'policies = ["fixed", "thompson", "random"]\ndefault_policy = "fixed"\n[policy_options.fixed]\nbackend = "down"\n'


async def test_a_failed_over_decision_teaches_the_answering_backend_and_stays_out_of_the_estimates(tmp_path, sqlite_url, embedder, fakes):
    fakes["down"].chat_status = 503
    service = _service(tmp_path, sqlite_url, embedder, fakes, FAILING_OVER)
    body, routed = await service.chat(chat_request("Say hi.", max_tokens=4))
    assert (routed.record.chosen, routed.record.backend) == ("down", "up")
    assert [f.backend for f in routed.failures] == ["down"]
    await service.feedback(routed.decision_id, None, reward=1.0)
    with Session(service.db) as session:
        row = session.get(DecisionRow, routed.decision_id)
        assert (row.chosen_backend, row.backend, row.status) == ("down", "up", "ok")
    thompson = service.policies["thompson"].stats()["arms"]
    assert thompson["up"]["feedback"] == 1 and thompson.get("down", {}).get("feedback", 0) == 0
    stats = await service.stats()
    for name in ("fixed", "thompson", "random"):
        shadow = stats["policies"][name]["shadow"]
        assert (shadow["rewards"], shadow["excluded_failover"]) == (0, 1), name
    await service.close()


async def test_feedback_during_a_stream_waits_for_its_final_write(tmp_path, sqlite_url, embedder, fakes):
    """The client has the decision id from the first byte; a reward posted mid-stream is learned with
    the backend that answered (after a failover) and the real cost, not the pre-failover guess."""
    fakes["down"].chat_status = 503
    fakes["up"].stream_gap_s = 0.3
    service = _service(tmp_path, sqlite_url, embedder, fakes, FAILING_OVER)
    events, routed = await service.chat_stream(chat_request("Say hi.", max_tokens=4, stream=True))
    first = await anext(events)
    assert first["choices"][0]["delta"]["content"] == "hi"
    feedback = asyncio.create_task(service.feedback(routed.decision_id, None, reward=1.0))
    await asyncio.sleep(0.1)
    assert not feedback.done(), "the reward waits while the answer is still streaming"
    rest = [event async for event in events]
    assert rest[-1] is None  # [DONE]
    result = await asyncio.wait_for(feedback, 10)
    assert not result.duplicate
    thompson = service.policies["thompson"].stats()["arms"]
    assert thompson["up"]["feedback"] == 1 and thompson.get("down", {}).get("feedback", 0) == 0
    assert (await service.stats())["policies"]["thompson"]["shadow"]["excluded_failover"] == 1
    await service.close()


async def test_concurrent_requests_never_overshoot_a_keys_budget(tmp_path, sqlite_url, embedder, fakes):
    """32 requests at once against a budget for 3: the worst case is reserved in the same step that
    reads the remaining budget, so exactly 3 are answered and the spend stays within the limit."""
    one_call = (3 * 0.1 + 1 * 0.2) / 1e6  # the fake bills 3 prompt tokens and 1 completion token on "down"
    keys = (f'[[auth.keys]]\nname = "team"\nkey_sha256 = "{"0" * 64}"\nmax_spend_usd = {3.5 * one_call}\n'
            'budget_period = "total"\n')
    service = _service(tmp_path, sqlite_url, embedder, fakes, 'policies = ["random"]\ndefault_policy = "random"\n' + keys)
    prompt = "Say hi to me"  # 12 characters: priced as 3 prompt tokens, as the fake bills
    results = await asyncio.gather(
        *(service.chat(chat_request(prompt, max_tokens=1), "team") for _ in range(32)), return_exceptions=True
    )
    answered = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, TooManyRequests)]
    assert len(answered) == 3 and len(refused) == 29, [type(r) for r in results if not isinstance(r, tuple)][:3]
    assert all(routed.record.backend == "down" for _, routed in answered), "the dearer backend never fits"
    spend = (await service.stats())["tenant_spend"]["team"]
    assert spend["spent_usd"] == pytest.approx(3 * one_call) and spend["spent_usd"] <= spend["max_spend_usd"]
    await service.close()


async def test_a_policy_that_fails_to_learn_stops_nothing_also_at_restart(tmp_path, sqlite_url, embedder, fakes, monkeypatch):
    from policies import registry

    extra = 'policies = ["thompson", "qlearning", "random"]\ndefault_policy = "thompson"\n'
    service = _service(tmp_path, sqlite_url, embedder, fakes, extra)

    def broken(self, feedback):
        raise RuntimeError("qlearning is broken")

    monkeypatch.setattr(registry.get("qlearning"), "_learn", broken)
    infos = [await route(service, chat_request(f"question {i}")) for i in range(3)]
    for info in infos:
        await service.feedback(info.decision_id, None, reward=0.5)
    stats = await service.stats()
    assert stats["policies"]["qlearning"]["learn_errors"] == 3
    assert stats["policies"]["thompson"]["learn_errors"] == 0
    assert sum(a["feedback"] for a in stats["policies"]["thompson"]["arms"].values()) == 3
    assert stats["policies"]["random"]["shadow"]["rewards"] == 3, "the shadow estimates went on"
    assert all(service.memory.entry(i.decision_id).reward == 0.5 for i in infos), "and so did the memory"
    service.db.dispose()  # no exit snapshot: the restart learns the rewards again from the log

    again = _service(tmp_path, sqlite_url, embedder, fakes, extra)  # the same rewards must not crash start-up
    restarted = await again.stats()
    assert restarted["policies"]["qlearning"]["learn_errors"] == 3
    assert sum(a["feedback"] for a in restarted["policies"]["thompson"]["arms"].values()) == 3
    await again.close()


async def test_a_chat_whose_decision_cannot_be_logged_calls_no_backend(tmp_path, sqlite_url, embedder, fakes):
    """The decision is logged before any backend is called: a write that fails fails the request before
    money is spent, and the decision is neither remembered nor counted."""
    service = _service(tmp_path, sqlite_url, embedder, fakes, 'policies = ["random"]\ndefault_policy = "random"\n')
    with service.db.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE decisions RENAME TO decisions_away")
    remembered = len(service.memory)
    with pytest.raises(Exception, match="decisions"):
        await service.chat(chat_request("Say hi.", max_tokens=4))
    assert len(service.memory) == remembered and fakes["up"].chats + fakes["down"].chats == 0
    assert service.engine.pacer.stats()["in_flight_usd"] == 0
    with service.db.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE decisions_away RENAME TO decisions")
    body, routed = await service.chat(chat_request("Say hi.", max_tokens=4))
    assert body["choices"][0]["message"]["content"] == "hi"
    await service.wait_for_final_write(routed.decision_id)
    with Session(service.db) as session:
        assert session.get(DecisionRow, routed.decision_id).status == "ok"
    await service.close()
