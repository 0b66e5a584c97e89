"""Training data for the predictors: rewarded decisions from the log, and imported history.

`llm-router import FILE.jsonl` loads a file in the shared data format (every model's outcome per prompt)
as imported outcomes. Model names map to backend names one to one unless renamed (`--as model=backend`);
outcomes of models that are not backends stay stored and count once a backend of that name exists.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, select
from sqlmodel import Session

from router.predictors.data import Outcome
from router.tables import DecisionRow, ImportedOutcome, Reward


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


def import_file(db: Engine, path: str | Path, rename: Mapping[str, str] | None = None) -> dict[str, int]:
    """Store every outcome of the file; importing the same file again adds nothing. Returns counts."""
    path = Path(path)
    rename = rename or {}
    source = path.name
    with Session(db) as session:
        existing = {
            (prompt_id, model)
            for prompt_id, model in session.execute(
                select(ImportedOutcome.prompt_id, ImportedOutcome.model).where(ImportedOutcome.source == source)
            )
        }
    added = skipped = prompts = 0
    now = datetime.now(UTC)
    batch: list[ImportedOutcome] = []
    for number, record in _records(path):
        prompts += 1
        prompt_id = str(record.get("id", number))
        for model, result in record["outcomes"].items():
            backend = rename.get(model, model)
            if (prompt_id, backend) in existing:
                skipped += 1
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
                quality=quality, output_tokens=result.get("output_tokens"), cost_usd=result.get("cost_usd"), imported_at=now,
            ))
            added += 1
    with Session(db) as session:  # one transaction: a file is imported whole or not at all
        session.add_all(batch)
        session.commit()
    return {"prompts": prompts, "outcomes_added": added, "outcomes_already_there": skipped}


def training_outcomes(db: Engine, backends: list[str]) -> list[Outcome]:
    """Imported outcomes (in file order, all at their import time) then rewarded decisions (at reward time)."""
    wanted = set(backends)
    with Session(db) as session:
        imported = session.execute(
            select(ImportedOutcome.prompt, ImportedOutcome.model, ImportedOutcome.quality, ImportedOutcome.output_tokens,
                   ImportedOutcome.imported_at)
            .where(ImportedOutcome.model.in_(wanted))
            .order_by(ImportedOutcome.id)
        ).all()
        logged = session.execute(
            select(DecisionRow.query, DecisionRow.backend, Reward.reward, DecisionRow.completion_tokens, Reward.created_at)
            .join(Reward, Reward.decision_id == DecisionRow.id)
            .where(DecisionRow.backend.in_(wanted), DecisionRow.status != "error")
            .order_by(Reward.id)
        ).all()
    return [Outcome(text, backend, float(quality), tokens, _seconds(at)) for text, backend, quality, tokens, at in [*imported, *logged]]


def _seconds(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
