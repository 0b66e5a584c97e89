"""The answer-aware modes without I/O: plans, the cost-quality frontier, agreement, and the runs."""

import asyncio
import math

import numpy as np
import pytest

from policies import Arm
from router.config import ModesConfig
from router.engine import DecisionRecord
from router.modes import VERIFY, Call, agreement, final_number, frontier, fuse_messages, plan, run, verification_score

ARMS = [Arm("cheap", 0.1, 0.2, 1e-6), Arm("mid", 1.0, 2.0, 1e-5), Arm("dear", 10.0, 20.0, 1e-4)]


def _record(chosen="mid", fallbacks=("dear", "cheap")) -> DecisionRecord:
    return DecisionRecord("d", "thompson", chosen, 0.5, 100, list(ARMS), [], 0.0, 1.0, fallbacks=list(fallbacks))


def test_frontier_keeps_backends_that_beat_every_cheaper_one():
    assert frontier(ARMS, {"cheap": 0.4, "mid": 0.3, "dear": 0.9}) == ["cheap", "dear"]
    assert frontier(ARMS, {"cheap": 0.4, "mid": 0.6, "dear": 0.9}) == ["cheap", "mid", "dear"]
    assert frontier(ARMS, {"cheap": 0.9}) == ["cheap"], "unknown backends count as 0.5"


def test_plans_call_what_each_mode_needs_and_the_cap_drops_calls():
    settings = ModesConfig(parallel_k=2, cascade_max_calls=2)
    record = _record()
    assert plan("parallel", record, settings, {}, 50, None, False).first == ["mid", "dear"]
    fuse = plan("fuse", record, settings, {}, 50, None, False)
    assert (fuse.first, fuse.second) == (["mid", "dear"], ["mid"]), "the chosen backend fuses by default"
    refine = plan("refine", record, settings, {}, 50, None, False)
    assert (refine.first, refine.second) == (["mid"], ["dear"])
    s2p = plan("s2p", record, settings, {}, 50, None, False)
    assert (s2p.first, s2p.second) == (["mid"], ["dear", "cheap"])
    cascade = plan("cascade", record, settings, {"cheap": 0.3, "mid": 0.5, "dear": 0.9}, 50, None, False)
    assert cascade.first == ["cheap", "mid"], "frontier order, cheapest first, at most cascade_max_calls"
    pinned = plan("parallel", record, settings, {}, 50, None, True)
    assert (pinned.mode, pinned.first) == ("route", ["mid"])
    # every call's worst case counts: prompt plus the output limit; the fuser also reads both answers
    single = plan("route", record, settings, {}, 50, None, False)
    assert single.worst_case_usd == pytest.approx((100 * 1.0 + 50 * 2.0) / 1e6)
    assert fuse.worst_case_usd == pytest.approx(((100 * 1.0 + 50 * 2.0) + (100 * 10 + 50 * 20) + ((100 + 100) * 1.0 + 50 * 2.0)) / 1e6)
    capped = plan("parallel", record, settings, {}, 50, 5e-5, False)
    assert (capped.mode, capped.first) == ("parallel", ["mid"]), "the dear second call would pass the cap"


def test_agreement_prefers_the_majority_number_then_the_most_central_answer():
    assert agreement(["It is 42.", "So 4,2 no: 42", "I get 41"], None) == [1.0, 1.0, 0.0]
    assert final_number("costs 1,250.5 dollars") == "1250.5"
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    scores = agreement(["a", "b", "c"], vectors)
    assert scores.index(max(scores)) in (0, 1) and scores[2] == min(scores)


def test_fuse_prompt_lists_candidates_best_weighted_first():
    messages = fuse_messages([{"role": "user", "content": "Q?"}], ["weak answer", "strong answer"], [0.2, 0.8])
    text = messages[-1]["content"]
    assert messages[0] == {"role": "user", "content": "Q?"}
    assert text.index("strong answer") < text.index("weak answer") and "weight 0.80" in text


def _caller(answers, log, failing=()):
    async def call(backend, role, body):
        log.append((backend, role, body["messages"][-1]["content"]))
        if backend in failing:
            return Call(0, role, backend, status="error", error="down")
        return Call(0, role, backend, answer=answers[backend], body={"choices": [{"message": {"content": answers[backend]}}]},
                    cost_usd=1.0, completion_tokens=3)
    return call


async def _by_length(query, answers, backends):
    return [len(a) / 100 for a in answers], "scorer"


def test_a_cascade_stops_at_the_first_answer_that_clears_the_bar():
    log = []
    cascade = plan("cascade", _record(), ModesConfig(cascade_max_calls=3), {"cheap": 0.3, "mid": 0.5, "dear": 0.9}, 50, None, False)
    answers = {"cheap": "x" * 10, "mid": "x" * 70, "dear": "x" * 90}
    result = asyncio.run(run(cascade, "q", {"messages": [{"role": "user", "content": "q"}]}, _caller(answers, log), _by_length, lambda b: 0.6))
    assert [b for b, _, _ in log] == ["cheap", "mid"], "0.1 is below the bar, 0.7 clears it: dear is never asked"
    assert result.delivered.backend == "mid" and [c.position for c in result.calls] == [0, 1]
    log.clear()
    result = asyncio.run(run(cascade, "q", {"messages": [{"role": "user", "content": "q"}]}, _caller(answers, log), _by_length, lambda b: None))
    assert [b for b, _, _ in log] == ["cheap"], "no absolute score (no scorer): the first answer is delivered"


def _verified(p_yes):
    """A backend's reply to a verification: one token with its top log-probabilities, as vLLM sends it."""
    top = [{"token": "Yes", "logprob": math.log(p_yes)}, {"token": " no", "logprob": math.log(1 - p_yes)}]
    return {"choices": [{"message": {"content": "Yes"}, "logprobs": {"content": [{"token": "Yes", "logprob": top[0]["logprob"],
                                                                               "top_logprobs": top}]}}]}


def _verifying_caller(answers, p_yes, log, failing=()):
    answer = _caller(answers, log, failing)

    async def call(backend, role, body):
        if role != VERIFY:
            return await answer(backend, role, body)
        log.append((backend, role, body))
        return Call(0, role, backend, body=_verified(p_yes[backend]), answer="Yes", cost_usd=0.5, completion_tokens=1)
    return call


def test_a_verified_cascade_asks_each_backend_to_check_its_answer_and_escalates_on_doubt():
    quality = {"cheap": 0.3, "mid": 0.5, "dear": 0.9}
    cascade = plan("cascade", _record(), ModesConfig(cascade_max_calls=3, cascade_judge="verify"), quality, 50, None, False)
    scored = plan("cascade", _record(), ModesConfig(cascade_max_calls=3), quality, 50, None, False)
    verifications = ((100 + 50) * 0.1 + 0.2 + (100 + 50) * 1.0 + 2.0) / 1e6  # prompt + answer in, one token out; none after dear
    assert cascade.judge == VERIFY and cascade.first == scored.first == ["cheap", "mid", "dear"]
    assert cascade.predicted_usd == pytest.approx(scored.predicted_usd + verifications)
    capped = plan("cascade", _record(), ModesConfig(cascade_judge="verify"), quality, 50, cascade.predicted_usd - 1e-6, False)
    assert capped.first == ["cheap", "mid"], "the cap drops dear, and then mid's verification (nothing to escalate to)"
    two = plan("cascade", _record(), ModesConfig(cascade_max_calls=2), quality, 50, None, False)
    assert capped.predicted_usd == pytest.approx(two.predicted_usd + ((100 + 50) * 0.1 + 0.2) / 1e6), "two answers, cheap's check"

    body = {"messages": [{"role": "user", "content": "q"}], "max_tokens": 50, "tools": [{"type": "function"}]}
    answers = {"cheap": "cheap says", "mid": "mid says", "dear": "dear says"}
    log = []
    result = asyncio.run(run(cascade, "q", body, _verifying_caller(answers, {"cheap": 0.3, "mid": 0.8}, log), _by_length, lambda b: 0.6))
    assert [(b, role) for b, role, _ in log] == [("cheap", "candidate"), ("cheap", VERIFY), ("mid", "candidate"), ("mid", VERIFY)]
    check = log[1][2]
    assert check["max_tokens"] == 1 and check["logprobs"] and "tools" not in check, "a one-token check, without the client's tools"
    assert check["messages"][-2] == {"role": "assistant", "content": "cheap says"} and "Yes or No" in check["messages"][-1]["content"]
    assert result.delivered.backend == "mid" and result.delivered.score == pytest.approx(0.8) and result.scored_by == VERIFY
    assert [c.position for c in result.calls] == [0, 1, 2, 3] and sum(c.cost_usd for c in result.calls) == 3.0
    log.clear()
    result = asyncio.run(run(cascade, "q", body, _verifying_caller(answers, {"cheap": 0.1, "mid": 0.2}, log), _by_length, lambda b: 0.6))
    assert [role for _, role, _ in log] == ["candidate", VERIFY, "candidate", VERIFY, "candidate"], "the last answer is not checked"
    assert result.delivered.backend == "dear", "every earlier answer failed its check: the last is delivered"
    log.clear()
    result = asyncio.run(run(cascade, "q", body, _verifying_caller(answers, {"cheap": 0.1}, log, failing={"mid"}), _by_length, lambda b: 0.6))
    assert [(b, role) for b, role, _ in log] == [("cheap", "candidate"), ("cheap", VERIFY), ("mid", "candidate"), ("dear", "candidate")], \
        "a failed step goes on down the chain without checking the earlier answer again"
    assert result.delivered.backend == "dear"


def test_a_verification_scores_the_probability_of_yes():
    assert verification_score(_verified(0.75)) == pytest.approx(0.75)
    assert verification_score({"choices": [{"message": {"content": "No."}}]}) == 0.0, "no log-probabilities: the token itself"
    assert verification_score({"choices": [{"message": {"content": "Perhaps"}}]}) is None
    assert verification_score(None) is None


def test_parallel_delivers_the_best_scored_and_refine_passes_the_draft_on():
    log = []
    answers = {"cheap": "short", "mid": "a much longer answer", "dear": "medium one"}
    body = {"messages": [{"role": "user", "content": "q"}]}
    parallel = plan("parallel", _record(), ModesConfig(parallel_k=3), {}, 50, None, False)
    result = asyncio.run(run(parallel, "q", body, _caller(answers, log), _by_length, lambda b: None))
    assert result.delivered.backend == "mid" and sum(c.cost_usd for c in result.calls) == 3.0
    log.clear()
    refine = plan("refine", _record(), ModesConfig(), {}, 50, None, False)
    result = asyncio.run(run(refine, "q", body, _caller(answers, log), _by_length, lambda b: None))
    assert [(b, role) for b, role, _ in log] == [("mid", "draft"), ("dear", "refine")]
    assert "a much longer answer" in log[1][2] and result.delivered.role == "refine"
    log.clear()
    result = asyncio.run(run(refine, "q", body, _caller(answers, log, failing={"dear"}), _by_length, lambda b: None))
    assert result.delivered.backend == "mid", "a refiner that fails leaves the draft delivered"
