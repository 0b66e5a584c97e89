"""Training data for the predictors: rewarded decisions from the log, and imported history.

`llm-router import FILE.jsonl` loads a file in the shared data format (every model's outcome per prompt)
as imported outcomes, with each model's answer text when the answers file beside it exists
(`X_routing.jsonl` -> `X_answers.jsonl`). Model names map to backend names one to one unless renamed
(`--as model=backend`); outcomes of models that are not backends stay stored and count once a backend of
that name exists. The answer scorer trains on every answer with a quality (`answer_samples`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, select, update
from sqlmodel import Session

from router.predictors.data import Outcome
from router.predictors.scorer import AnswerSample
from router.tables import DecisionCall, DecisionRow, ImportedOutcome, Reward


class HistoryFileError(ValueError):
    """A file that is not in the shared data format; the message names the line."""


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    text = path.read_text()
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: prompts may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record.get("outcomes"), dict) or not isinstance(record.get("prompt"), str):
                raise ValueError("needs 'prompt' and 'outcomes'")
        except (ValueError, AttributeError) as exc:
            raise HistoryFileError(f"{path.name} line {number}: {exc}") from exc
        yield number, record


def answers_path(path: str | Path) -> Path | None:
    """The answers file beside a routing file (`X_routing.jsonl` -> `X_answers.jsonl`), or None."""
    path = Path(path)
    if not path.name.endswith("_routing.jsonl"):
        return None
    return path.with_name(path.name.removesuffix("_routing.jsonl") + "_answers.jsonl")


def read_answers(path: Path) -> dict[str, dict[str, str]]:
    """prompt id -> model -> answer text, from an answers file (`{"id", "answers": {model: text}}` per line)."""
    answers: dict[str, dict[str, str]] = {}
    for number, line in enumerate(path.read_text().split("\n"), 1):  # not splitlines: answers may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            texts = record["answers"]
            if not isinstance(texts, dict) or not all(isinstance(t, str) for t in texts.values()):
                raise ValueError("'answers' must map model names to texts")
            answers[str(record["id"])] = texts
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HistoryFileError(f"{path.name} line {number}: {exc}") from exc
    return answers


def import_file(db: Engine, path: str | Path, rename: Mapping[str, str] | None = None) -> dict[str, int]:
    """Store every outcome of the file (with its answer text when the answers file beside it has one);
    importing the same file again adds nothing, but fills in answers missing from outcomes stored before.
    Returns counts."""
    path = Path(path)
    rename = rename or {}
    source = path.name
    beside = answers_path(path)
    answers = read_answers(beside) if beside is not None and beside.is_file() else {}
    with Session(db) as session:
        stored = session.execute(
            select(ImportedOutcome.prompt_id, ImportedOutcome.model, ImportedOutcome.answer).where(ImportedOutcome.source == source)
        ).all()
    existing = {(prompt_id, model) for prompt_id, model, _ in stored}
    without_answer = {(prompt_id, model) for prompt_id, model, answer in stored if answer is None}
    fill: list[tuple[str, str, str]] = []  # (prompt id, backend, answer) of stored outcomes that had none
    added = skipped = prompts = with_answer = 0
    now = datetime.now(UTC)
    batch: list[ImportedOutcome] = []
    for number, record in _records(path):
        prompts += 1
        prompt_id = str(record.get("id", number))
        texts = answers.get(prompt_id, {})
        for model, result in record["outcomes"].items():
            backend = rename.get(model, model)
            answer = texts.get(model)
            if (prompt_id, backend) in existing:
                skipped += 1
                if answer is not None and (prompt_id, backend) in without_answer:
                    fill.append((prompt_id, backend, answer))
                    without_answer.discard((prompt_id, backend))
                continue
            try:
                quality = float(result["quality"])
            except (KeyError, TypeError, ValueError) as exc:
                raise HistoryFileError(f"{source} line {number}: outcome of {model!r} has no numeric quality") from exc
            if not 0.0 <= quality <= 1.0:
                raise HistoryFileError(f"{source} line {number}: quality {quality} of {model!r} is outside [0, 1]")
            existing.add((prompt_id, backend))
            batch.append(ImportedOutcome(
                source=source, prompt_id=prompt_id, prompt=record["prompt"], dataset=record.get("dataset"), model=backend,
                quality=quality, output_tokens=result.get("output_tokens"), cost_usd=result.get("cost_usd"), answer=answer,
                imported_at=now,
            ))
            added += 1
            with_answer += answer is not None
    with Session(db) as session:  # one transaction: a file is imported whole or not at all
        session.add_all(batch)
        for prompt_id, backend, answer in fill:
            session.execute(
                update(ImportedOutcome)
                .where(ImportedOutcome.source == source, ImportedOutcome.prompt_id == prompt_id, ImportedOutcome.model == backend)
                .values(answer=answer)
            )
        session.commit()
    return {"prompts": prompts, "outcomes_added": added, "outcomes_already_there": skipped,
            "answers_added": with_answer + len(fill)}


def training_outcomes(db: Engine, backends: list[str]) -> list[Outcome]:
    """Imported outcomes (in file order, all at their import time) then rewarded decisions (at reward time)."""
    with Session(db) as session:
        logged = session.execute(
            select(DecisionRow.query, DecisionRow.backend, Reward.reward, DecisionRow.completion_tokens, Reward.created_at)
            .join(Reward, Reward.decision_id == DecisionRow.id)
            .where(DecisionRow.backend.in_(set(backends)), DecisionRow.status != "error")
            .order_by(Reward.id)
        ).all()
    return [*imported_outcomes(db, backends), *(Outcome(text, backend, float(quality), tokens, _seconds(at))
                                                for text, backend, quality, tokens, at in logged)]


def imported_outcomes(db: Engine, backends: list[str]) -> list[Outcome]:
    """Imported outcomes of `backends` alone (in file order, at their import time): what warm starts learn
    from (logged rewards reach the policies through the log instead)."""
    with Session(db) as session:
        imported = session.execute(
            select(ImportedOutcome.prompt, ImportedOutcome.model, ImportedOutcome.quality, ImportedOutcome.output_tokens,
                   ImportedOutcome.imported_at)
            .where(ImportedOutcome.model.in_(set(backends)))
            .order_by(ImportedOutcome.id)
        ).all()
    return [Outcome(text, backend, float(quality), tokens, _seconds(at)) for text, backend, quality, tokens, at in imported]


def answer_samples(db: Engine) -> list[AnswerSample]:
    """The answer scorer's training data, every answer with a quality (of any backend: the scorer scores
    text): imported outcomes with an answer (at their import time), then rewarded decisions whose answer
    was stored (at reward time): the delivered call of a multi-call decision (`decision_calls`, delivered,
    with an answer) and otherwise the decision's own `answer`, with the decision's reward as its quality.
    Candidates that were not delivered carry no reward and are left out."""
    with Session(db) as session:
        imported = session.execute(
            select(ImportedOutcome.prompt, ImportedOutcome.model, ImportedOutcome.answer, ImportedOutcome.quality,
                   ImportedOutcome.imported_at)
            .where(ImportedOutcome.answer.is_not(None))
            .order_by(ImportedOutcome.id)
        ).all()
        delivered = session.execute(
            select(DecisionCall.decision_id, DecisionRow.query, DecisionCall.backend, DecisionCall.answer, Reward.reward,
                   Reward.created_at)
            .join(DecisionRow, DecisionRow.id == DecisionCall.decision_id)
            .join(Reward, Reward.decision_id == DecisionCall.decision_id)
            .where(DecisionCall.delivered.is_(True), DecisionCall.answer.is_not(None), DecisionCall.status == "ok")
            .order_by(Reward.id, DecisionCall.position)
        ).all()
        logged = session.execute(
            select(DecisionRow.id, DecisionRow.query, DecisionRow.backend, DecisionRow.answer, Reward.reward, Reward.created_at)
            .join(Reward, Reward.decision_id == DecisionRow.id)
            .where(DecisionRow.answer.is_not(None), DecisionRow.status != "error")
            .order_by(Reward.id)
        ).all()
    samples = [AnswerSample(prompt, model, answer, float(quality), _seconds(at)) for prompt, model, answer, quality, at in imported]
    seen: set[str] = set()
    for decision_id, query, backend, answer, reward, at in delivered:
        if decision_id not in seen:  # one delivered answer per decision
            seen.add(decision_id)
            samples.append(AnswerSample(query, backend, answer, float(reward), _seconds(at)))
    samples.extend(
        AnswerSample(query, backend, answer, float(reward), _seconds(at))
        for decision_id, query, backend, answer, reward, at in logged
        if decision_id not in seen
    )
    return samples


def _seconds(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
