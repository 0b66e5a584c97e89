"""Imported history in the running service: policies without a snapshot warm-start from it (once, never
again after a restart that restores them), and the `mf` model the training job fits on it routes `mf`
queries, hot-swapped in when the job promotes it. Real database (SQLite, PostgreSQL, several replicas),
real embedder, fake backends on loopback."""

import json
from pathlib import Path

import pytest

from router.config import load_config
from router.db import create_db_engine, migrate
from router.history import import_file
from router.predictors import build_tiny_backbone
from router.predictors.mf import MfArtifactStore
from router.service import RouterService
from tests.conftest import backend_table, chat_request, route, write_config
from tests.fake_backend import FakeVLLM

SAMPLE = Path(__file__).parents[1] / "data" / "llmrouter_sample.jsonl"  # 400 prompts x 3 models
SMALL, MID, LARGE = "gemma-2-9b-it", "llama-3.1-8b-instruct", "llama-3.1-nemotron-51b-instruct"
BEST = LARGE  # mean quality in the sample: 0.622, against 0.549 and 0.547


@pytest.fixture
def fakes():
    servers = {name: FakeVLLM(name) for name in (SMALL, MID, LARGE)}
    yield servers
    for server in servers.values():
        server.close()


def _config(tmp_path, url, fakes, policies, extra="", name="router"):
    backends = "".join(backend_table(n, fakes[n].port, p, p) for n, p in ((SMALL, 0.1), (MID, 0.2), (LARGE, 0.9)))
    top = f"policies = {json.dumps(policies)}\ndefault_policy = {json.dumps(policies[0])}\n{extra}"
    return load_config(write_config(tmp_path / f"{name}.toml", url, backends, top, health_interval_s=600), environ={})


def _import(url):
    db = create_db_engine(url)
    migrate(db)
    assert import_file(db, SAMPLE)["prompts"] == 400
    db.dispose()


async def _started(config, embedder):
    service = RouterService(config, embedder=embedder)
    await service.start()
    return service


@pytest.fixture(params=["sqlite", "postgresql", "replicas"])
def setup(request, tmp_path):
    """(database url, extra config): one process on SQLite or PostgreSQL, or a replica of several."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url"), ""
    return request.getfixturevalue("pg_url"), '[cluster]\nenabled = true\nreplica_id = "r1"\n' if request.param == "replicas" else ""


async def test_policies_start_from_the_imported_history_once(tmp_path, setup, fakes, embedder):
    url, extra = setup
    _import(url)
    first = await _started(_config(tmp_path, url, fakes, ["thompson", "random"], extra), embedder)
    stats = (await first.stats())["policies"]
    assert stats["thompson"]["warm_start_prompts"] == 400
    assert stats["random"]["warm_start_prompts"] == 0  # nothing to learn from history
    means = stats["thompson"]["internals"]["global_means"]
    assert max(means, key=means.get) == BEST and means[BEST] == pytest.approx(0.6222, abs=1e-3)
    # 400 prompts of evidence: the best backend of the history gets almost every query from the start
    # (cold, with no evidence at all, each of the three would get about a third)
    infos = [await route(first, chat_request(f"Question {i}: what is {i} + {i}?")) for i in range(5)]
    assert all(info.backend == BEST and info.propensity > 0.9 for info in infos)
    await first.close()  # writes the snapshot

    # Restored from the snapshot: not warm-started again; a policy new in the config is
    second = await _started(_config(tmp_path, url, fakes, ["thompson", "random", "elo"], extra), embedder)
    stats = (await second.stats())["policies"]
    assert stats["thompson"]["warm_start_prompts"] == 400, "restored with its warm start, not given a second one"
    assert stats["thompson"]["internals"]["global_means"] == means
    assert stats["elo"]["warm_start_prompts"] == 400
    ratings = stats["elo"]["internals"]["global_ratings"]
    assert max(ratings, key=ratings.get) == BEST
    await second.close()


async def test_mf_routes_on_the_model_the_job_trains_and_promotes(tmp_path, sqlite_url, fakes, embedder):
    _import(sqlite_url)
    predictors = {"backbone": str(build_tiny_backbone("distilbert", tmp_path / "tiny")), "artifacts_dir": str(tmp_path / "artifacts"),
                  "epochs": 1, "batch_size": 32, "schedule": "off", "min_samples": 50}
    section = "[predictors]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in predictors.items())
    service = await _started(_config(tmp_path, sqlite_url, fakes, ["mf", "thompson"], section), embedder)
    query = "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many clips did she sell?"
    before = await route(service, chat_request(query))
    assert before.policy == "mf" and before.propensity < 1  # no model yet: the fallback bandit decides

    runs = {run["kind"]: run for run in await service.train()}  # the real job, in the worker process
    assert runs["mf"]["promoted"] and service.predictors.versions["mf"] == "v0001", "swapped in once promoted"
    assert runs["forc"]["promoted"] and not service.predictors.ready, "no forc or hybrid policy: no encoder pass per query"
    model = MfArtifactStore(tmp_path / "artifacts").load_mf([SMALL, MID, LARGE])
    assert model is not None
    for text in (query, "Write a Python function that reverses a linked list."):
        expected = model.quality(embedder.embed([text]))[0]
        info = await route(service, chat_request(text))
        assert info.propensity == 1.0 and info.backend == max(expected, key=expected.get)
        assert info.scores == pytest.approx(expected, abs=1e-5), "the model's estimates are the scores (no budget: no penalty)"
    stats = await service.stats()
    internals = stats["policies"]["mf"]["internals"]
    assert (internals["decided_by_model"], internals["decided_by_fallback"]) == (2, 1)
    assert stats["predictors"]["models"]["mf"]["version"] == "v0001"
    assert stats["predictors"]["models"]["mf"]["samples"]["train"] == 320
    await service.close()
