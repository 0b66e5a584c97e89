"""The answer scorer (router.predictors.scorer): a cross-encoder over (query, answer) trained for real (a tiny
DistilBERT built from config, the packaged MiniLM tokenizer) on real recorded answers of ../shared/data's
alpaca_eval, its files, the import of answers, its training data from the log, the training job and the
PredictorSet that serves it."""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlmodel import Session, select

from router.config import load_config
from router.db import create_db_engine, migrate
from router.history import answer_samples, import_file
from router.predicting import PredictorSet
from router.predictors import (
    AnswerSample,
    AnswerScorer,
    ArtifactStore,
    TrainSettings,
    build_tiny_backbone,
    length_scores,
    should_promote_scorer,
    train_scorer,
)
from router.predictors.scorer import group_samples, group_scores, ranking_loss, selection_regret
from router.tables import DecisionCall, DecisionRow, ImportedOutcome, Reward, TrainingRun
from router.training import KINDS, run_training
from tests.conftest import backend_table, free_port, shared_data_dir, unavailable, write_config


def _alpaca(n: int, seed: int = 0) -> tuple[list[dict], dict[str, dict[str, str]]]:
    """`n` random prompts of the shared alpaca_eval routing file and the answers beside it."""
    routing, answers = shared_data_dir() / "alpaca_eval_routing.jsonl", shared_data_dir() / "alpaca_eval_answers.jsonl"
    if not (routing.is_file() and answers.is_file()):
        unavailable(f"shared alpaca_eval routing and answers files not found in {shared_data_dir()}")
    lines = [line for line in routing.read_text().split("\n") if line.strip()]
    records = [json.loads(lines[i]) for i in random.Random(seed).sample(range(len(lines)), n)]
    wanted = {r["id"] for r in records}
    texts = {}
    for line in answers.read_text().split("\n"):
        if line.strip() and (row := json.loads(line))["id"] in wanted:
            texts[row["id"]] = row["answers"]
    return records, texts


def _samples(records: list[dict], answers: dict[str, dict[str, str]]) -> list[AnswerSample]:
    return [
        AnswerSample(r["prompt"], model, answers[r["id"]][model], float(o["quality"]), float(position))
        for position, r in enumerate(records)
        for model, o in r["outcomes"].items()
    ]


def _write_pair(directory: Path, records: list[dict], answers: dict[str, dict[str, str]] | None, name: str = "mini") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    routing = directory / f"{name}_routing.jsonl"
    routing.write_text("".join(json.dumps(r) + "\n" for r in records))
    if answers is not None:
        (directory / f"{name}_answers.jsonl").write_text("".join(json.dumps({"id": r["id"], "answers": answers[r["id"]]}) + "\n" for r in records))
    return routing


def tiny_settings(backbone: Path, **changes: object) -> TrainSettings:
    fields = {"backbone": str(backbone), "max_length": 64, "epochs": 2, "batch_size": 32, "learning_rate": 1e-3,
              "head_learning_rate": 1e-3, "trainable_layers": None, "threads": 2, "validation_fraction": 0.3}
    return TrainSettings(**(fields | changes))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_backbone("distilbert", tmp_path_factory.mktemp("backbone") / "distilbert")


@pytest.fixture(scope="module")
def trained(backbone: Path):
    """A scorer trained on 160 alpaca_eval prompts x 12 answers; the latest 30% of the prompts validate."""
    records, answers = _alpaca(160)
    return train_scorer(_samples(records, answers), tiny_settings(backbone))


def test_the_listwise_loss_prefers_the_right_order_and_regret_shares_ties():
    qualities = torch.tensor([0.9, 0.1, 0.5, 0.2])
    right, wrong = torch.tensor([3.0, -3.0, 1.0, 0.0]), torch.tensor([-3.0, 3.0, 0.0, 1.0])
    assert ranking_loss(right, qualities, [2, 2]) < ranking_loss(wrong, qualities, [2, 2])
    groups = group_samples([AnswerSample("p", "a", "x", 0.9, 0), AnswerSample("p", "b", "y", 0.1, 0),
                            AnswerSample("q", "a", "z", 0.4, 1)])
    assert selection_regret(groups, [[0.2, 0.8], [0.5]]) == pytest.approx(0.8)  # "q" has one answer: no ranking
    assert selection_regret(groups, [[0.5, 0.5], [0.5]]) == pytest.approx(0.4)  # a tie shares the pick
    assert selection_regret(groups[1:], [[0.5]]) is None


def test_the_scorer_ranks_held_out_answers_better_than_length_or_a_random_pick(trained):
    """On the validation prompts (never trained on), the top-scored of 12 answers beats a uniform pick and
    the longest answer (the judge's favourite cue) by a wide margin: the backends' learned priors and the
    text together. Without the backends (as a caller that does not say who wrote what) it still beats a
    uniform pick."""
    validation = group_samples(trained.validation)
    assert trained.samples.train + trained.samples.validation == 160 and len(validation) == 48
    scores = group_scores(trained.predictor, validation)
    picked = np.mean([g.qualities[int(np.argmax(s))] for g, s in zip(validation, scores)])
    uniform = np.mean([np.mean(g.qualities) for g in validation])
    longest = np.mean([g.qualities[int(np.argmax(length_scores(g.answers)))] for g in validation])
    assert picked > uniform + 0.15 and picked > longest + 0.1, (picked, uniform, longest)
    assert trained.validation_loss < trained.baseline_loss - 0.15
    assert trained.validation_loss == pytest.approx(np.mean([max(g.qualities) for g in validation]) - picked)
    values = [v for s in scores for v in s]
    assert all(0.0 <= v <= 1.0 for v in values) and np.std(values) > 0.01
    # Platt scaling on the validation answers: the mean estimate is the mean quality there
    assert np.mean(values) == pytest.approx(np.mean([q for g in validation for q in g.qualities]), abs=2e-3)
    blind = [trained.predictor.score(g.prompt, g.answers) for g in validation]
    assert np.mean([g.qualities[int(np.argmax(s))] for g, s in zip(validation, blind)]) > uniform + 0.1


def test_save_load_round_trip_gives_the_same_scores_and_the_store_versions_it(trained, tmp_path):
    scorer = trained.predictor
    query = "Give me three tips for a first marathon."
    answers = ["1. Train slowly.\n2. Sleep.\n3. Eat well.", "Run.", "Start with a plan that builds mileage gradually " * 20]
    before = scorer.score(query, answers)
    scorer.save(tmp_path / "saved")
    again = AnswerScorer.load(tmp_path / "saved")
    assert again.score(query, answers) == pytest.approx(before, abs=1e-6)
    assert scorer.score(query, []) == []

    store = ArtifactStore(tmp_path / "artifacts")
    assert store.load_current("scorer") is None
    version = store.save_candidate(trained)
    store.promote(version)
    loaded = store.load_current("scorer", ["any", "backends"])  # a scorer scores any backend's answers
    assert loaded is not None and loaded.score(query, answers) == pytest.approx(before, abs=1e-6)
    metadata = store.metadata(version)
    assert metadata.kind == "scorer" and metadata.predictor.kind == "scorer" and metadata.validation_loss == trained.validation_loss


def test_promotion_follows_the_validation_loss_on_the_candidates_split(trained):
    assert should_promote_scorer(trained, None).promote
    same = should_promote_scorer(trained, trained.predictor)
    assert same.promote and same.current_loss == pytest.approx(trained.validation_loss)
    worse = dataclasses.replace(trained, validation_loss=trained.validation_loss + 0.05)
    refused = should_promote_scorer(worse, trained.predictor)
    assert not refused.promote and ">" in refused.reason


def test_import_stores_the_answers_beside_the_routing_file(tmp_path, sqlite_url):
    records, answers = _alpaca(12, seed=3)
    db = create_db_engine(sqlite_url)
    migrate(db)
    first_half = _write_pair(tmp_path / "a", records[:6], None)  # no answers file yet: outcomes only
    assert import_file(db, first_half)["answers_added"] == 0
    path = _write_pair(tmp_path / "a", records, answers)  # the same file grown, now with its answers
    counts = import_file(db, path)
    assert counts == {"prompts": 12, "outcomes_added": 72, "outcomes_already_there": 72, "answers_added": 144}
    assert import_file(db, path) == {"prompts": 12, "outcomes_added": 0, "outcomes_already_there": 144, "answers_added": 0}
    with Session(db) as session:
        rows = session.exec(select(ImportedOutcome)).all()
    assert len(rows) == 144 and all(row.answer == answers[row.prompt_id][row.model] for row in rows)
    samples = answer_samples(db)
    assert len(samples) == 144 and {s.backend for s in samples} == set(records[0]["outcomes"])
    db.dispose()


def test_rewarded_delivered_answers_are_scorer_training_data(sqlite_url):
    db = create_db_engine(sqlite_url)
    migrate(db)
    now = datetime.now(UTC)

    def decision(id_: str, backend: str, answer: str | None, mode: str = "route") -> DecisionRow:
        return DecisionRow(id=id_, kind="chat", requested_model="auto", query=f"query {id_}", prompt_tokens_estimate=3, policy="thompson",
                           backend=backend, propensity=0.5, decision_ms=1.0, status="ok", mode=mode, answer=answer)

    with Session(db) as session:
        session.add_all([decision("d1", "a", "plain answer"), decision("d2", "b", "delivered", "parallel"),
                         decision("d3", "a", None), decision("d4", "a", "never rewarded")])
        session.commit()
        session.add_all([
            DecisionCall(decision_id="d2", position=0, role="candidate", backend="a", status="ok", answer="not delivered"),
            DecisionCall(decision_id="d2", position=1, role="candidate", backend="b", status="ok", delivered=True, answer="delivered"),
            Reward(decision_id="d1", reward=0.25, created_at=now), Reward(decision_id="d2", reward=0.75, created_at=now),
            Reward(decision_id="d3", reward=1.0, created_at=now),
        ])
        session.commit()
    samples = sorted((s.prompt, s.backend, s.answer, s.quality) for s in answer_samples(db))
    assert samples == [("query d1", "a", "plain answer", 0.25), ("query d2", "b", "delivered", 0.75)]
    db.dispose()


def test_the_training_job_trains_promotes_and_serves_the_scorer(tmp_path, sqlite_url, backbone):
    assert KINDS == ("forc", "hybrid", "scorer")
    records, answers = _alpaca(70, seed=5)
    path = _write_pair(tmp_path / "data", records, answers)
    options = {"backbone": str(backbone), "artifacts_dir": str(tmp_path / "artifacts"), "epochs": 1, "batch_size": 32,
               "max_length": 64, "learning_rate": 1e-3, "schedule": "off", "min_samples": 50, "threads": 2}
    section = "[predictors]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    backends = backend_table("small", free_port(), 0.1, 0.1) + backend_table("large", free_port(), 1.0, 1.0)
    config = load_config(write_config(tmp_path / "router.toml", sqlite_url, backends, section), environ={})
    db = create_db_engine(sqlite_url)
    migrate(db)
    import_file(db, path)

    served = PredictorSet(config.predictors.artifacts_dir, ["small", "large"])
    assert served.reload()["scorer"] is None and served.score("q", ["a", "b"]) is None
    runs = {run["kind"]: run for run in run_training(config, "cli")}
    assert runs["scorer"]["status"] == "ok" and runs["scorer"]["promoted"] and runs["scorer"]["version"] == "v0001"
    assert runs["scorer"]["samples_train"] + runs["scorer"]["samples_validation"] == 70
    assert runs["forc"]["status"] == "skipped"  # the imported models are not this router's backends
    assert served.reload()["scorer"] == "v0001" and served.scorer is not None
    scores = served.score(records[0]["prompt"], list(answers[records[0]["id"]].values()))
    assert scores is not None and len(scores) == 12 and all(0 <= s <= 1 for s in scores)
    assert served.describe()["scorer"]["predictor"]["kind"] == "scorer"
    with Session(db) as session:
        assert session.exec(select(TrainingRun).where(TrainingRun.kind == "scorer")).one().promoted
    db.dispose()


def test_the_scorer_skips_while_too_few_prompts_have_answers(tmp_path, sqlite_url, backbone):
    records, _ = _alpaca(20, seed=6)
    path = _write_pair(tmp_path / "data", records, None)
    options = {"backbone": str(backbone), "artifacts_dir": str(tmp_path / "artifacts"), "schedule": "off", "min_samples": 10}
    section = "[predictors]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    config = load_config(write_config(tmp_path / "router.toml", sqlite_url, backend_table("small", free_port(), 0.1, 0.1), section), environ={})
    db = create_db_engine(sqlite_url)
    migrate(db)
    import_file(db, path)
    runs = {run["kind"]: run for run in run_training(config, "cli")}
    assert runs["scorer"]["status"] == "skipped" and "0 prompts with answers" in runs["scorer"]["error"]
    db.dispose()
