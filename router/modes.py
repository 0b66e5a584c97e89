"""Answer-aware modes: several backend calls under one decision, and choosing what to deliver.

`route` is one call (the service's plain path). The others look at answers before delivering one:
- `cascade` (FrugalGPT, AutoMix): backends along the cost-quality frontier, cheapest first; stop at the
  first answer whose score clears the threshold (lowered by the budget's lambda times the next call's
  cost, so cost pressure stops a cascade earlier); deliver the best-scored answer seen.
- `parallel` (PI): the policy's top k backends at once; deliver the best-scored answer.
- `fuse` (P2S): parallel answers, then a fuser backend writes one answer from them, weighted by scores.
- `refine` (SI): a draft from the chosen backend, improved by a second one.
- `s2p`: a serial draft, then k refiners in parallel, then selection among the draft and the refinements.

Scores come from the trained answer scorer when there is one; without it, selection is by agreement
(a strict majority on the final number when every answer ends in one, else the answer closest on
average to the others by embedding similarity), and a cascade, which needs an absolute score, stops
after its first answer. A cascade can judge by self-verification instead (`judge = "verify"`, AutoMix):
the backend that answered is asked whether its answer is correct (one more call, one output token), and
its probability of "Yes" is the score; no training needed. The cascade then delivers the first answer
that passes, else the last one.

Nothing here does I/O: the service passes in how to call a backend, how to score and how to embed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policies import Arm
from router.budget import predict_cost
from router.config import ModesConfig
from router.engine import DecisionRecord

ROUTE = "route"
VERIFY = "verify"  # a cascade's self-verification: the judge and the role of its calls


@dataclass
class Call:
    """One backend call of a decision, as logged (`decision_calls`) and listed in the response."""

    position: int
    role: str  # answer | draft | candidate | verify | refine | fuse
    backend: str
    status: str = "ok"  # ok | error
    delivered: bool = False
    score: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    error: str | None = None
    answer: str | None = None
    body: dict[str, Any] | None = field(default=None, repr=False)  # the backend's response, for delivery


@dataclass(frozen=True)
class Plan:
    """The backends a mode will call, in the order it calls them, and what that may cost."""

    mode: str
    judge: str  # cascade: scorer | verify (see `verify_body`)
    first: list[str]  # cascade: in order, one at a time; parallel/fuse: at once; refine/s2p: the draft
    second: list[str]  # refine: the refiner; s2p: the refiners (at once); fuse: the fuser
    predicted_usd: float
    worst_case_usd: float


def _costs(arm: Arm, prompt_tokens: int, output_limit: int, answers_in_prompt: int) -> tuple[float, float]:
    """(predicted, worst case) of one call whose prompt carries `answers_in_prompt` earlier answers."""
    grown = prompt_tokens + answers_in_prompt * output_limit
    expected_out = arm.predicted_cost_usd - predict_cost(arm.price_per_1m_input_tokens_usd, 0.0, prompt_tokens, 0)
    predicted = predict_cost(arm.price_per_1m_input_tokens_usd, 0.0, grown, 0) + max(expected_out, 0.0)
    worst = predict_cost(arm.price_per_1m_input_tokens_usd, arm.price_per_1m_output_tokens_usd, grown, output_limit)
    return predicted, worst


def frontier(arms: Sequence[Arm], quality: dict[str, float]) -> list[str]:
    """Backends on the upper-left cost-quality frontier, cheapest first: each one better than every
    cheaper one kept (a backend with no estimate yet counts as 0.5)."""
    kept: list[str] = []
    best = -1.0
    for arm in sorted(arms, key=lambda a: a.predicted_cost_usd):
        estimate = quality.get(arm.name, 0.5)
        if estimate > best:
            kept.append(arm.name)
            best = estimate
    return kept


def plan(
    mode: str,
    record: DecisionRecord,
    settings: ModesConfig,
    quality: dict[str, float],
    output_limit: int,
    max_cost_usd: float | None,
    pinned: bool,
    judge: str | None = None,
) -> Plan:
    """What `mode` will call for this decision. The per-request cap bounds the predicted total: calls
    that would pass it are dropped (one call always stays). A pinned request is one call. A cascade
    judged by verification counts one verification call after each of its answers but the last."""
    arms = {a.name: a for a in record.arms}
    ranked = [record.chosen, *[b for b in record.fallbacks if b in arms]]
    k = min(settings.parallel_k, len(ranked))
    judge = judge or settings.cascade_judge
    if pinned or mode == ROUTE or len(ranked) == 1:
        mode, first, second = ROUTE, [record.chosen], []
    elif mode == "cascade":
        first, second = frontier(list(arms.values()), quality)[: settings.cascade_max_calls], []
    elif mode == "parallel":
        first, second = ranked[:k], []
    elif mode == "fuse":
        first, second = ranked[:k], [settings.fuser or record.chosen]
    elif mode == "refine":
        first, second = [record.chosen], [settings.refiner or ranked[1]]
    else:  # s2p
        first, second = [record.chosen], [settings.refiner or b for b in ranked[1 : k + 1]]
    # (backend, earlier answers carried in its prompt, is a verification)
    calls = [(b, 0, False) for b in first] + [(b, len(first) if mode == "fuse" else 1, False) for b in second]
    if mode == "cascade" and judge == VERIFY:
        calls = [step for n, b in enumerate(first) for step in [(b, 0, False), (b, 1, True)][: 1 if n == len(first) - 1 else 2]]
    costs: list[tuple[float, float]] = []
    kept: list[tuple[str, int, bool]] = []
    for backend, carried, verifying in calls:
        arm = arms.get(backend) or Arm(backend, 0.0, 0.0)
        p, w = _verify_costs(arm, record.prompt_tokens, output_limit) if verifying else _costs(arm, record.prompt_tokens, output_limit, carried)
        if kept and max_cost_usd is not None and sum(c[0] for c in costs) + p > max_cost_usd:
            break
        kept.append((backend, carried, verifying))
        costs.append((p, w))
    if kept[-1][2]:  # a verification with nothing left to escalate to is not made
        kept, costs = kept[:-1], costs[:-1]
    answering = [b for b, _, verifying in kept if not verifying]
    first_kept, second_kept = answering[: len(first)], answering[len(first) :]
    return Plan(mode, judge, first_kept, second_kept, sum(c[0] for c in costs), sum(c[1] for c in costs))


def _verify_costs(arm: Arm, prompt_tokens: int, output_limit: int) -> tuple[float, float]:
    """(predicted, worst case) of a verification: the prompt and an answer in, one token out."""
    grown = prompt_tokens + output_limit
    cost = predict_cost(arm.price_per_1m_input_tokens_usd, arm.price_per_1m_output_tokens_usd, grown, 1)
    return cost, cost


def answer_text(body: dict[str, Any] | None) -> str:
    try:
        return str(body["choices"][0]["message"]["content"] or "")  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return ""


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def agreement(answers: Sequence[str], vectors: np.ndarray | None) -> list[float]:
    """Training-free scores: a strict majority on the final number when every answer ends in one;
    otherwise each answer's mean cosine similarity to the others (needs `vectors`)."""
    numbers = [final_number(a) for a in answers]
    if all(numbers):
        counts = {n: numbers.count(n) for n in numbers}
        top = max(counts.values())
        if top * 2 > len(answers):
            return [1.0 if counts[n] == top else 0.0 for n in numbers]
    if vectors is None or len(answers) < 2:
        return [0.5] * len(answers)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)
    similarity = unit @ unit.T
    similarity = (similarity + similarity.T) / 2  # the product need not be symmetric bit for bit: two answers tie exactly
    np.fill_diagonal(similarity, 0.0)
    return [float(total) / (len(answers) - 1) for total in similarity.sum(axis=1)]


def fuse_messages(messages: list[dict[str, Any]], answers: Sequence[str], scores: Sequence[float]) -> list[dict[str, Any]]:
    """The fuser's prompt: the conversation, then the candidates with their weights (best first)."""
    ranked = sorted(zip(scores, answers), key=lambda pair: -pair[0])
    total = sum(max(s, 1e-6) for s, _ in ranked)
    listing = "\n\n".join(f"Candidate {i + 1} (weight {max(s, 1e-6) / total:.2f}):\n{a}" for i, (s, a) in enumerate(ranked))
    instruction = (
        "Several assistants answered the conversation above. Write the single best answer to the last user "
        "message, relying most on the candidates with the highest weight and correcting their mistakes. "
        "Reply with the answer only.\n\n" + listing
    )
    return [*messages, {"role": "user", "content": instruction}]


def refine_messages(messages: list[dict[str, Any]], draft: str) -> list[dict[str, Any]]:
    instruction = (
        "Here is a draft answer to the last user message above. Check it, fix any mistakes and improve it. "
        "Reply with the improved answer only.\n\nDraft:\n" + draft
    )
    return [*messages, {"role": "user", "content": instruction}]


VERIFY_QUESTION = "Is the answer above correct and complete? Reply with Yes or No only."
VERIFY_TOP_LOGPROBS = 20  # vLLM's default cap on top_logprobs


def verify_body(body: dict[str, Any], answer: str) -> dict[str, Any]:
    """AutoMix's self-verification as one call: the conversation, the answer as the assistant's turn, then
    the question; one greedy token with its top log-probabilities. Only the conversation is kept from the
    client's request (tools, response formats or stop strings would bend a one-word reply)."""
    messages = [*list(body.get("messages") or []), {"role": "assistant", "content": answer}, {"role": "user", "content": VERIFY_QUESTION}]
    return {"messages": messages, "max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": VERIFY_TOP_LOGPROBS}


def verification_score(body: dict[str, Any] | None) -> float | None:
    """P(Yes) / (P(Yes) + P(No)) over the first token's top log-probabilities (any case, spaces ignored);
    without log-probabilities, 1 or 0 by the token itself. None when the reply is neither."""
    try:
        first = body["choices"][0]["logprobs"]["content"][0]  # type: ignore[index]
        options = [(str(t["token"]), float(t["logprob"])) for t in first.get("top_logprobs") or [first]]
    except (KeyError, IndexError, TypeError, ValueError):
        options = [(answer_text(body), 0.0)]
    mass = {"yes": 0.0, "no": 0.0}
    for token, logprob in options:
        word = token.strip().strip(".!").lower()
        if word in mass:
            mass[word] += float(np.exp(logprob))
    total = mass["yes"] + mass["no"]
    return mass["yes"] / total if total > 0 else None


CallBackend = Callable[[str, str, dict[str, Any]], Awaitable[Call]]  # (backend, role, body) -> the call, ok or error
# (query, answers, the backends that wrote them) -> (scores, how they were scored)
Score = Callable[[str, list[str], list[str]], Awaitable[tuple[list[float], str]]]


@dataclass
class ModeResult:
    calls: list[Call]
    delivered: Call | None
    scored_by: str | None  # scorer | agreement | verify | None (nothing was compared)


async def run(
    plan_: Plan,
    query: str,
    body: dict[str, Any],
    call: CallBackend,
    score: Score,
    threshold: Callable[[str], float | None],
) -> ModeResult:
    """Carry out a plan. `call` never raises for a backend failure (it returns a Call with status
    error, failover already tried); `threshold(next_backend)` is the cascade's bar before asking it,
    None when no absolute score exists (the cascade then stops after its first answer)."""
    calls: list[Call] = []
    scored_by: str | None = None

    async def ask(backends: list[str], role: str, request: dict[str, Any]) -> list[Call]:
        made = await asyncio.gather(*(call(b, role, request) for b in backends))
        for made_call in made:
            made_call.position = len(calls)
            calls.append(made_call)
        return [c for c in made if c.status == "ok"]

    async def rate(candidates: list[Call]) -> None:
        nonlocal scored_by
        if len(candidates) < 2 and plan_.mode != "cascade":
            return
        values, scored_by = await score(query, [c.answer or "" for c in candidates], [c.backend for c in candidates])
        for c, value in zip(candidates, values):
            c.score = value

    def best(candidates: list[Call]) -> Call | None:
        if not candidates:
            return None
        return max(candidates, key=lambda c: (c.score if c.score is not None else -1.0, -c.position))

    messages = list(body.get("messages") or [])
    mode = plan_.mode
    delivered: Call | None
    if mode == "cascade":
        answered: list[Call] = []
        verifying = plan_.judge == VERIFY
        for index, backend in enumerate(plan_.first):
            fresh = await ask([backend], "candidate", body)
            if not fresh:  # this step failed: the earlier answers were judged already, go on down the chain
                continue
            answered += fresh
            if not verifying:
                await rate(fresh)
            if index + 1 >= len(plan_.first):
                break
            bar = threshold(plan_.first[index + 1])
            if bar is None:
                break
            if verifying:  # asked of the backend that answered (failover may pick another)
                checked = await ask([answered[-1].backend], VERIFY, verify_body(body, answered[-1].answer or ""))
                answered[-1].score = verification_score(checked[0].body) if checked else None
                scored_by = VERIFY
            if answered[-1].score is not None and answered[-1].score >= bar:
                break
        # verification: the answer that passed, else the last (each earlier one failed its check)
        delivered = (answered[-1] if answered else None) if verifying else best(answered)
    elif mode in ("parallel", "fuse"):
        answered = await ask(plan_.first, "candidate", body)
        await rate(answered)
        delivered = best(answered)
        if mode == "fuse" and len(answered) >= 2 and plan_.second:
            scores = [c.score if c.score is not None else 1.0 for c in answered]
            fusing = {**body, "messages": fuse_messages(messages, [c.answer or "" for c in answered], scores)}
            fused = await ask(plan_.second[:1], "fuse", fusing)
            delivered = fused[0] if fused else delivered
    elif mode in ("refine", "s2p"):
        drafts = await ask(plan_.first, "draft", body)
        delivered = drafts[0] if drafts else None
        if delivered is not None and plan_.second:
            refining = {**body, "messages": refine_messages(messages, delivered.answer or "")}
            refined = await ask(plan_.second, "refine", refining)
            if mode == "refine":
                delivered = refined[0] if refined else delivered
            elif refined:
                candidates = [delivered, *refined]
                await rate(candidates)
                delivered = best(candidates)
    else:  # route
        answered = await ask(plan_.first, "answer", body)
        delivered = answered[0] if answered else None
    if delivered is not None:
        delivered.delivered = True
    return ModeResult(calls, delivered, scored_by)
