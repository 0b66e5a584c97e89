"""Predictors in the service: import history, the training job, promotion, the scheduler, hot swap,
broken artifacts, and the `forc` / `hybrid` policies deciding from the trained models.

Backbones are tiny DistilBERT / DeBERTa-v2 models built from config with the packaged MiniLM tokenizer
(the real architectures, trained for seconds); the history is real recorded outcomes.
"""

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from router.cli import main
from router.config import load_config
from router.db import create_db_engine, migrate
from router.history import HistoryFileError, import_file, training_outcomes
from router.predictors import build_tiny_backbone
from router.service import RouterService
from router.tables import DecisionRow, ImportedOutcome, TrainingRun
from router.training import run_training
from tests.conftest import backend_table, chat_request, free_port, route, write_config

SAMPLE = Path(__file__).parents[1] / "data" / "llmrouter_sample.jsonl"
SMALL, MID, LARGE = "gemma-2-9b-it", "llama-3.1-8b-instruct", "llama-3.1-nemotron-51b-instruct"


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {kind: str(build_tiny_backbone(kind, root / kind)) for kind in ("distilbert", "deberta-v2")}


def _config(tmp_path, url, backbone, **predictors):
    backends = backend_table(SMALL, free_port(), 0.1, 0.1) + backend_table(MID, free_port(), 0.2, 0.2) + backend_table(LARGE, free_port(), 0.9, 0.9)
    options = {"backbone": backbone, "artifacts_dir": str(tmp_path / "artifacts"), "epochs": 3, "batch_size": 16,
               "learning_rate": 1e-3, "schedule": "off", "min_samples": 50, **predictors}
    section = "[predictors]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    extra = 'policies = ["forc", "hybrid", "thompson"]\ndefault_policy = "forc"\n' + section
    return write_config(tmp_path / "router.toml", url, backends, extra)


def _request(text: str):
    return chat_request(text, max_tokens=8)


def test_import_is_idempotent_and_rejects_bad_files(tmp_path, sqlite_url):
    db = create_db_engine(sqlite_url)
    migrate(db)
    first = import_file(db, SAMPLE, {"gemma-2-9b-it": "renamed"})
    assert first == {"prompts": 400, "outcomes_added": 1200, "outcomes_already_there": 0, "answers_added": 0}  # no answers file beside it
    assert import_file(db, SAMPLE, {"gemma-2-9b-it": "renamed"})["outcomes_added"] == 0
    assert {o.backend for o in training_outcomes(db, ["renamed", LARGE])} == {"renamed", LARGE}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "outcomes": {"m": {"quality": 1.0}}}\n{"prompt": "q", "outcomes": {"m": {"quality": 7}}}\n')
    with pytest.raises(HistoryFileError, match="line 2"):
        import_file(db, bad)
    with Session(db) as session:  # all or nothing: the good first line was not kept either
        assert session.exec(select(ImportedOutcome).where(ImportedOutcome.source == "bad.jsonl")).first() is None
    db.dispose()


def test_training_beats_a_constant_and_a_worse_model_is_not_promoted(tmp_path, sqlite_url, backbones, caplog):
    path = _config(tmp_path, sqlite_url, backbones["distilbert"])
    assert main(["import", str(SAMPLE), "--config", str(path)]) == 0
    assert main(["train", "--config", str(path)]) == 0
    config = load_config(path, environ={})
    db = create_db_engine(sqlite_url)
    with Session(db) as session:
        runs = {r.kind: r for r in session.exec(select(TrainingRun)).all()}
    assert runs["scorer"].status == "skipped"  # no answers imported: nothing for the answer scorer
    runs = {kind: run for kind, run in runs.items() if kind != "scorer"}
    assert set(runs) == {"forc", "hybrid"} and all(r.status == "ok" and r.promoted for r in runs.values())
    assert runs["forc"].validation_loss < runs["forc"].baseline_loss
    assert runs["hybrid"].validation_loss < runs["hybrid"].baseline_loss
    assert runs["forc"].samples_train + runs["forc"].samples_validation == 400
    assert abs(runs["hybrid"].details["large_share"] - 0.5) < 0.1

    # An untrained candidate (0 epochs) scores worse on the same split: saved, not promoted.
    worse = config.model_copy(update={"predictors": config.predictors.model_copy(update={"epochs": 0})})
    again = {r["kind"]: r for r in run_training(worse, "cli")}
    assert not again["forc"]["promoted"] and again["forc"]["validation_loss"] > again["forc"]["current_validation_loss"]
    assert (tmp_path / "artifacts" / "forc" / "current").read_text().strip() == runs["forc"].version
    db.dispose()


async def test_predictor_policies_route_from_the_models_and_fall_back_when_broken(tmp_path, sqlite_url, backbones, embedder, caplog):
    path = _config(tmp_path, sqlite_url, backbones["deberta-v2"])
    assert main(["import", str(SAMPLE), "--config", str(path)]) == 0
    service = RouterService(load_config(path, environ={}), embedder=embedder)
    assert service.predictors is not None and not service.predictors.ready
    before = await route(service, _request("What is 12 * 7?"))
    assert before.policy == "forc" and before.propensity < 1  # the fallback bandit: no model yet
    await asyncio.to_thread(run_training, service.config, "cli")
    assert service.predictors.reload() == {"forc": "v0001", "hybrid": "v0001", "scorer": None, "mf": None}  # no mf policy: no mf run
    info = await route(service, _request("What is 12 * 7?"))
    assert info.propensity == 1.0 and set(info.scores) == {SMALL, MID, LARGE}
    stats = await service.stats()
    assert stats["policies"]["forc"]["internals"]["decided_by_model"] == 1
    assert stats["predictors"]["models"]["hybrid"]["predictor"]["small"] == SMALL
    assert [r["kind"] for r in stats["predictors"]["runs"]] == ["scorer", "hybrid", "forc"]

    # A corrupt artifact: the next load refuses it with a logged reason and the bandit decides again.
    weights = next((tmp_path / "artifacts" / "forc" / "v0001").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    service.predictors.versions["forc"] = None
    with caplog.at_level(logging.WARNING, logger="llm_router"):
        service.predictors.reload()
    assert service.predictors.forc is None and any("forc" in r.getMessage() for r in caplog.records)
    await route(service, _request("What is 12 * 7?"))
    internals = (await service.stats())["policies"]["forc"]["internals"]
    assert (internals["decided_by_model"], internals["decided_by_fallback"]) == (1, 2)
    await service.close()


async def test_hot_swap_under_concurrent_routing_drops_nothing(tmp_path, sqlite_url, backbones, embedder):
    path = _config(tmp_path, sqlite_url, backbones["distilbert"], epochs=1)
    assert main(["import", str(SAMPLE), "--config", str(path)]) == 0
    service = RouterService(load_config(path, environ={}), embedder=embedder)
    await asyncio.to_thread(run_training, service.config, "cli")
    service.predictors.reload()
    # A second version, promoted whatever its loss, swapped in while 200 decisions are in flight.
    versions_before = dict(service.predictors.versions)

    async def swap() -> None:
        await asyncio.to_thread(run_training, service.config, "cli")
        store = service.predictors.store
        store.promote(store.versions("forc")[-1])
        await asyncio.to_thread(service.predictors.reload)

    texts = [json.loads(line)["prompt"][:300] for line in SAMPLE.read_text().splitlines()[:200]]
    results = await asyncio.gather(swap(), *(route(service, _request(t)) for t in texts), return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    assert service.predictors.versions["forc"] == "v0002" != versions_before["forc"]
    await service.writer.submit(lambda session: None)
    with Session(service.db) as session:
        assert len(session.exec(select(DecisionRow)).all()) == 200
    await service.close()


async def test_the_scheduler_fires_a_training_job(tmp_path, sqlite_url, backbones, embedder):
    path = _config(tmp_path, sqlite_url, backbones["distilbert"], schedule="interval", interval_minutes=0.02, epochs=1)
    assert main(["import", str(SAMPLE), "--config", str(path)]) == 0
    service = RouterService(load_config(path, environ={}), embedder=embedder)
    await service.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and service.predictors.versions["forc"] is None:
            await asyncio.sleep(0.5)
        assert service.predictors.versions["forc"] == "v0001"  # trained in the worker process, then swapped in
        runs = (await service.stats())["predictors"]["runs"]
        assert runs and {r["trigger"] for r in runs} == {"schedule"} and runs[0]["duration_s"] > 0
    finally:
        await service.close()
