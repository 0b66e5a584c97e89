"""Answer-aware modes in the service, against fake backends on loopback (answers chosen by the test)
and a real database; every mode end to end on the real CPU vLLM servers too."""

import asyncio
import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select, update
from sqlmodel import Session

from router.config import load_config
from router.history import answer_samples
from router.service import RouterService
from router.tables import DecisionCall, DecisionRow
from tests.conftest import backend_table, chat_request, write_config
from tests.fake_backend import FakeVLLM

NAMES = ("cheap", "mid", "dear")


@pytest.fixture
def fakes():
    servers = {name: FakeVLLM(name) for name in NAMES}
    yield servers
    for server in servers.values():
        server.close()


def _service(tmp_path, url, embedder, fakes, extra="") -> RouterService:
    prices = {"cheap": (0.1, 0.2), "mid": (1.0, 2.0), "dear": (10.0, 20.0)}
    backends = "".join(backend_table(n, fakes[n].port, *prices[n]) for n in NAMES)
    config = 'policies = ["thompson", "random"]\ndefault_policy = "thompson"\n[modes]\nparallel_k = 3\n' + extra
    path = write_config(tmp_path / "router.toml", url, backends, config, health_interval_s=600)
    return RouterService(load_config(path, environ={}), embedder=embedder)


def _calls(service, decision_id):
    with Session(service.db) as session:
        return session.execute(select(DecisionCall).where(DecisionCall.decision_id == decision_id).order_by(DecisionCall.position)).scalars().all()


async def test_parallel_asks_every_backend_delivers_the_majority_and_logs_each_call(tmp_path, sqlite_url, embedder, fakes):
    for name, answer in zip(NAMES, ("The answer is 41.", "I get 42.", "It is 42")):
        fakes[name].answer = answer
    service = _service(tmp_path, sqlite_url, embedder, fakes)
    body, routed = await service.chat(chat_request("What is 6 times 7?", max_tokens=8, router={"mode": "parallel"}))
    assert body["choices"][0]["message"]["content"] in ("I get 42.", "It is 42")
    assert routed.record.mode == "parallel" and len(routed.calls) == 3
    assert sum(f.chats for f in fakes.values()) == 3
    assert routed.cost_usd == pytest.approx(sum(c.cost_usd for c in routed.calls))
    assert body["usage"]["completion_tokens"] == 3, "usage counts every call"
    await service.wait_for_final_write(routed.decision_id)  # written after the answer went out
    rows = _calls(service, routed.decision_id)
    assert [r.role for r in rows] == ["candidate"] * 3 and sum(r.delivered for r in rows) == 1
    assert all(r.answer is None for r in rows), "answers are not stored unless configured"
    with Session(service.db) as session:
        row = session.get(DecisionRow, routed.decision_id)
        assert (row.mode, row.answer, row.cost_usd) == ("parallel", None, pytest.approx(routed.cost_usd))
    await service.feedback(routed.decision_id, None, reward=1.0)
    stats = await service.stats()
    assert stats["policies"]["thompson"]["shadow"]["excluded_multi_call"] == 1
    arms = stats["policies"]["thompson"]["arms"]
    assert arms[routed.record.backend]["feedback"] == 1, "the delivered answer's backend is credited"
    assert sum(a["feedback"] for a in arms.values()) == 1
    await service.close()


async def test_fuse_and_refine_pass_the_answers_on_and_fail_over_inside(tmp_path, sqlite_url, embedder, fakes):
    fakes["cheap"].answer, fakes["mid"].answer, fakes["dear"].answer = "draft from cheap", "draft from mid", "final"
    service = _service(tmp_path, sqlite_url, embedder, fakes, 'fuser = "dear"\nrefiner = "dear"\n')
    _, routed = await service.chat(chat_request("Explain tides.", max_tokens=8, router={"mode": "fuse"}))
    fused = fakes["dear"].requests[-1]["messages"][-1]["content"]
    assert "draft from cheap" in fused and "draft from mid" in fused and "weight" in fused
    assert [c.role for c in routed.calls][-1] == "fuse" and routed.record.backend == "dear"
    fakes["dear"].chat_status = 503  # the refiner is down: the call fails over to a backend the plan does not use
    body, routed = await service.chat(chat_request("Explain tides.", max_tokens=8, router={"mode": "refine"}))
    refine = [c for c in routed.calls if c.role == "refine"]
    assert len(refine) == 1 and refine[0].status == "ok" and refine[0].backend != "dear"
    assert "dear" in [f.backend for f in routed.failures]
    assert "Draft:" in fakes[refine[0].backend].requests[-1]["messages"][-1]["content"]
    await service.close()


async def test_a_mode_streams_the_delivered_answer_and_stores_answers_when_configured(tmp_path, sqlite_url, embedder, fakes):
    for name in NAMES:
        fakes[name].answer = f"answer from {name}"
    service = _service(tmp_path, sqlite_url, embedder, fakes, "[answers]\nstore = true\nretention_days = 1\n")
    events, routed = await service.chat_stream(chat_request("Hello?", max_tokens=8, stream=True, router={"mode": "s2p"}))
    chunks = [event async for event in events]
    assert chunks[-1] is None and chunks[0]["choices"][0]["delta"]["content"] == routed.calls[[c.delivered for c in routed.calls].index(True)].answer
    assert chunks[-2]["usage"]["completion_tokens"] == len(routed.calls)
    assert [c.role for c in routed.calls] == ["draft", "refine", "refine"]
    await service.wait_for_final_write(routed.decision_id)
    rows = _calls(service, routed.decision_id)
    assert all(r.answer and r.answer.startswith("answer from") for r in rows)
    with Session(service.db) as session:
        assert session.get(DecisionRow, routed.decision_id).answer.startswith("answer from")
        session.execute(update(DecisionRow).values(created_at=datetime.now(UTC) - timedelta(days=2)))
        session.commit()
    assert await service.purge_answers() == 1
    assert all(r.answer is None for r in _calls(service, routed.decision_id))
    await service.close()


async def test_a_reward_on_a_stored_answer_reaches_the_scorers_training_data(tmp_path, sqlite_url, embedder, fakes):
    for name in NAMES:
        fakes[name].answer = f"answer from {name}"
    service = _service(tmp_path, sqlite_url, embedder, fakes, "[answers]\nstore = true\n")
    _, one = await service.chat(chat_request("Name a colour.", max_tokens=8))
    _, several = await service.chat(chat_request("Name a fruit.", max_tokens=8, router={"mode": "parallel"}))
    await service.chat(chat_request("Name a tree.", max_tokens=8))  # answered and stored, never rewarded: not training data
    await service.feedback(one.decision_id, None, reward=0.25)
    await service.feedback(several.decision_id, None, reward=0.75)
    delivered = next(c for c in several.calls if c.delivered)
    samples = sorted((s.prompt, s.backend, s.answer, s.quality) for s in answer_samples(service.db))
    assert samples == [  # the delivered answers, with their rewards; the others carry no reward
        ("Name a colour.", one.record.backend, f"answer from {one.record.backend}", 0.25),
        ("Name a fruit.", delivered.backend, f"answer from {delivered.backend}", 0.75),
    ]
    await service.close()


async def test_a_budget_that_fits_one_call_but_not_three_gets_one(tmp_path, sqlite_url, embedder, fakes):
    one_call_worst = (3 * 10.0 + 4 * 20.0) / 1e6  # the dearest backend, 3 prompt tokens, max_tokens 4; all three: 1.11x that
    keys = f'[[auth.keys]]\nname = "team"\nkey_sha256 = "{"0" * 64}"\nmax_spend_usd = {1.05 * one_call_worst}\n'
    service = _service(tmp_path, sqlite_url, embedder, fakes, keys)
    _, routed = await service.chat(chat_request("Say hi to me", max_tokens=4, router={"mode": "parallel"}), "team")
    assert routed.plan.mode == "route" and len(routed.calls) == 0 and sum(f.chats for f in fakes.values()) == 1
    await service.close()


async def test_without_a_scorer_a_cascade_delivers_its_first_answer(tmp_path, sqlite_url, embedder, fakes):
    service = _service(tmp_path, sqlite_url, embedder, fakes)
    _, routed = await service.chat(chat_request("Hello?", max_tokens=4, router={"mode": "cascade"}))
    assert [c.backend for c in routed.calls] == ["cheap"], "unknown quality: the frontier is the cheapest; no score to escalate on"
    await service.close()


async def test_a_cascade_judged_by_verification_escalates_when_a_backend_doubts_its_answer(tmp_path, sqlite_url, embedder, fakes):
    service = _service(tmp_path, sqlite_url, embedder, fakes, 'cascade_judge = "verify"\ncascade_threshold = 0.5\n')
    for name, reward in (("cheap", 0.3), ("mid", 0.6), ("dear", 0.9)):  # what the cascade orders the frontier by
        _, pinned = await service.chat(chat_request(f"Warm-up for {name}", model=name, max_tokens=4))
        await service.feedback(pinned.decision_id, None, reward=reward)
    assert service.engine.quality_estimates("thompson") == {"cheap": 0.3, "mid": 0.6, "dear": 0.9}
    fakes["cheap"].answer, fakes["mid"].answer = "No", "Yes"  # each one's answer, and its verdict on it (no log-probabilities)
    body, routed = await service.chat(chat_request("Is water wet?", max_tokens=8, router={"mode": "cascade"}))
    assert [(c.backend, c.role, c.score) for c in routed.calls] == [
        ("cheap", "candidate", 0.0), ("cheap", "verify", None), ("mid", "candidate", 1.0), ("mid", "verify", None)]
    assert body["choices"][0]["message"]["content"] == "Yes" and routed.record.backend == "mid" and fakes["dear"].chats == 1
    assert fakes["cheap"].requests[-1]["max_tokens"] == 1 and fakes["cheap"].requests[-1]["messages"][-2]["content"] == "No"
    assert routed.cost_usd == pytest.approx(sum(c.cost_usd for c in routed.calls)), "the checks are paid for too"
    _, judged = await service.chat(chat_request("Is fire hot?", max_tokens=8, router={"mode": "cascade", "judge": "scorer"}))
    assert [c.role for c in judged.calls] == ["candidate"], "per request: the scorer judges (none trained: one answer)"
    await service.wait_for_final_write(routed.decision_id)
    assert [r.role for r in _calls(service, routed.decision_id)] == ["candidate", "verify", "candidate", "verify"]
    await service.close()


@pytest.mark.vllm
@pytest.mark.parametrize("mode", ["cascade", "parallel", "fuse", "refine", "s2p"])
def test_every_mode_end_to_end_on_vllm(mode, tmp_path, sqlite_url, vllm_backends, start_router):
    backends = backend_table("smol-a", vllm_backends["smol-a"], 0.05, 0.10) + backend_table("smol-b", vllm_backends["smol-b"], 0.50, 1.50)
    router = start_router(write_config(tmp_path / "router.toml", sqlite_url, backends, "[modes]\nparallel_k = 2\n"))
    request = {"model": "auto", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "router": {"mode": mode}}
    answer = httpx.post(f"{router.url}/v1/chat/completions", json=request, timeout=120)
    assert answer.status_code == 200, answer.text
    info = answer.json()["router"]
    assert info["mode"] in (mode, "route") and answer.json()["choices"][0]["message"]["content"]
    if mode != "cascade":
        assert len(info["calls"]) >= 2 and sum(c["delivered"] for c in info["calls"]) == 1
        assert info["cost_usd"] == pytest.approx(sum(c["cost_usd"] for c in info["calls"] if c["cost_usd"]))
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json={**request, "stream": True}, timeout=120) as stream:
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert first["router"]["mode"] in (mode, "route") and first["choices"][0]["delta"]["content"]
    reward = httpx.post(f"{router.url}/v1/rewards", json={"decision_id": info["decision_id"], "reward": 0.7}, timeout=30)
    assert reward.status_code == 200, reward.text
    asyncio.run(asyncio.sleep(0))


@pytest.mark.vllm
def test_a_verified_cascade_on_vllm_reads_the_backends_own_probability_of_yes(tmp_path, sqlite_url, vllm_backends, start_router):
    backends = backend_table("smol-a", vllm_backends["smol-a"], 0.05, 0.10) + backend_table("smol-b", vllm_backends["smol-b"], 0.50, 1.50)
    router = start_router(write_config(tmp_path / "router.toml", sqlite_url, backends, '[modes]\ncascade_judge = "verify"\n'))
    for name, reward in (("smol-a", 0.4), ("smol-b", 0.8)):  # the frontier: smol-a first, then smol-b
        pinned = httpx.post(f"{router.url}/v1/chat/completions", timeout=120,
                            json={"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        httpx.post(f"{router.url}/v1/rewards", json={"decision_id": pinned.json()["router"]["decision_id"], "reward": reward}, timeout=30)
    request = {"model": "auto", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 8, "router": {"mode": "cascade"}}
    answer = httpx.post(f"{router.url}/v1/chat/completions", json=request, timeout=120)
    assert answer.status_code == 200, answer.text
    calls = answer.json()["router"]["calls"]
    assert [(c["backend"], c["role"]) for c in calls[:2]] == [("smol-a", "candidate"), ("smol-a", "verify")]
    score = calls[0]["score"]
    assert 0.0 <= score <= 1.0, "P(Yes) read from the backend's log-probabilities"
    escalated = score < 0.5  # the default threshold, no budget pressure
    assert [c["backend"] for c in calls[2:]] == (["smol-b"] if escalated else [])
    assert answer.json()["router"]["backend"] == ("smol-b" if escalated else "smol-a")
