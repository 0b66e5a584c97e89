"""The predictor training job: from the log (and imported history) to a promoted model, or not.

One run trains FORC and Hybrid-LLM on every outcome the database holds for the configured backends, and
the answer scorer on every answer with a quality it holds (imported answers, rewarded delivered answers:
`router.history.answer_samples`), scores each candidate and the model in use on the candidate's
validation split (the latest prompts), saves the candidate as a new version and promotes it only if it is
no worse. Every run, trained or
skipped or failed, is a row in `training_runs`. The service runs this in a separate process with its own
torch thread budget (`TrainingScheduler`), so routing keeps its latency while a model trains;
`llm-router train` runs it once in the foreground.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import time
from collections.abc import Callable
from typing import Any

from sqlmodel import Session, select

from router.config import RouterConfig
from router.db import create_db_engine
from router.history import answer_samples, training_outcomes
from router.predictors import (
    KINDS,
    ArtifactStore,
    TrainSettings,
    should_promote,
    should_promote_scorer,
    train_forc,
    train_hybrid,
    train_scorer,
)
from router.tables import TrainingRun

log = logging.getLogger("llm_router")

__all__ = ["KINDS", "TrainingScheduler", "recent_runs", "run_training", "train_settings"]


def train_settings(config: RouterConfig) -> TrainSettings:
    p = config.predictors
    return TrainSettings(
        backbone=p.backbone, max_length=p.max_length, epochs=p.epochs, batch_size=p.batch_size, learning_rate=p.learning_rate,
        trainable_layers=p.trainable_layers, validation_fraction=p.validation_fraction, threads=p.threads,
        seed=config.seed or 0, max_samples=p.max_samples,
    )


def run_training(config: RouterConfig, trigger: str) -> list[dict[str, Any]]:
    """Train every predictor kind once (`PREDICTOR_KINDS`: FORC, Hybrid-LLM, the answer scorer, and `mf` while the
    `mf` policy runs); returns the recorded runs (as dicts)."""
    db = create_db_engine(config.database_url)
    try:
        backends = [b.name for b in config.backends]
        outcomes = training_outcomes(db, backends)
        store = ArtifactStore(config.predictors.artifacts_dir)
        runs = [
            _train_scorer(db, config, store, trigger) if kind == "scorer" else _train_one(db, config, store, kind, outcomes, backends, trigger)
            for kind in KINDS
        ]
        if "mf" in config.policy_names:  # RouteLLM's matrix factorisation, trained when the `mf` policy runs
            runs.append(_train_mf(db, config, trigger))
        return runs
    finally:
        db.dispose()


def _train_one(db: Any, config: RouterConfig, store: ArtifactStore, kind: str, outcomes: list, backends: list[str], trigger: str) -> dict[str, Any]:
    started = time.perf_counter()
    run = TrainingRun(kind=kind, trigger=trigger, status="ok")
    settings = train_settings(config)
    small, large = config.hybrid_pair()
    try:
        prompts = _prompts_with_outcomes(outcomes, backends if kind == "forc" else [small, large], both=kind == "hybrid")
        if prompts < config.predictors.min_samples:
            run.status = "skipped"
            run.error = f"{prompts} prompts with outcomes; {config.predictors.min_samples} needed"
        else:
            if kind == "forc":
                result = train_forc(outcomes, backends, settings)
            else:
                result = train_hybrid(outcomes, small, large, config.predictors.hybrid_tolerance,
                                      config.predictors.target_large_share, settings)
            current = store.load_current(kind, backends)
            promotion = should_promote(result, current)
            version = store.save_candidate(result)
            if promotion.promote:
                store.promote(version)
            run.samples_train, run.samples_validation = result.samples.train, result.samples.validation
            run.validation_loss, run.baseline_loss = result.validation_loss, result.baseline_loss
            run.current_validation_loss, run.promoted, run.version = promotion.current_loss, promotion.promote, version.name
            run.details = {"reason": promotion.reason, "outcomes": result.samples.outcomes, "backbone": result.backbone}
            if kind == "hybrid":
                predictor = result.predictor
                run.details |= {"small": small, "large": large, "threshold": predictor.threshold,
                                "large_share": predictor.large_share, "target_large_share": config.predictors.target_large_share}
    except Exception as exc:  # a failed run is recorded and logged; the model in use stays
        log.exception("%s training failed", kind)
        run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
    return _record(db, run, started)


def _train_scorer(db: Any, config: RouterConfig, store: ArtifactStore, trigger: str) -> dict[str, Any]:
    """The answer scorer on every answer with a quality (of any backend: it scores text, not backends);
    skipped while fewer than `min_samples` prompts have one."""
    started = time.perf_counter()
    run = TrainingRun(kind="scorer", trigger=trigger, status="ok")
    try:
        samples = answer_samples(db)
        prompts = len({sample.prompt for sample in samples})
        if prompts < config.predictors.min_samples:
            run.status = "skipped"
            run.error = f"{prompts} prompts with answers; {config.predictors.min_samples} needed"
        else:
            result = train_scorer(samples, train_settings(config))
            promotion = should_promote_scorer(result, store.load_current("scorer"))
            version = store.save_candidate(result)
            if promotion.promote:
                store.promote(version)
            run.samples_train, run.samples_validation = result.samples.train, result.samples.validation
            run.validation_loss, run.baseline_loss = result.validation_loss, result.baseline_loss
            run.current_validation_loss, run.promoted, run.version = promotion.current_loss, promotion.promote, version.name
            run.details = {"reason": promotion.reason, "answers": result.samples.outcomes, "backbone": result.backbone,
                           "validation_metric": "mean selection regret over validation prompts with >= 2 answers "
                                                "(BCE of the scores where none has two)"}
    except Exception as exc:  # a failed run is recorded and logged; the model in use stays
        log.exception("scorer training failed")
        run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
    return _record(db, run, started)


def _train_mf(db: Any, config: RouterConfig, trigger: str) -> dict[str, Any]:
    """RouteLLM's matrix factorisation on every outcome and preference the database holds for the configured
    backends, promoted on validation (`router.predictors.mf.train_mf_job`: skipped, failed or trained)."""
    from router.predictors.mf import KIND, MfSettings, train_mf_job

    started = time.perf_counter()
    run = TrainingRun(kind=KIND, trigger=trigger, status="ok")
    p = config.predictors
    settings = MfSettings(validation_fraction=p.validation_fraction, max_samples=p.max_samples, threads=p.threads, seed=config.seed or 0)
    try:
        for key, value in train_mf_job(db, p.artifacts_dir, [b.name for b in config.backends], p.min_samples, settings,
                                       config.embedder).items():
            setattr(run, key, value)
    except Exception as exc:  # a failed run is recorded and logged; the model in use stays
        log.exception("mf training failed")
        run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
    return _record(db, run, started)


def _record(db: Any, run: TrainingRun, started: float) -> dict[str, Any]:
    run.duration_s = time.perf_counter() - started
    with Session(db) as session:
        session.add(run)
        session.commit()
        session.refresh(run)
        recorded = run.model_dump(mode="json")
    log.info("%s training %s: %s", run.kind, run.status, {k: recorded[k] for k in ("samples_train", "validation_loss", "promoted", "version")})
    return recorded


def _prompts_with_outcomes(outcomes: list, backends: list[str], both: bool) -> int:
    seen: dict[str, set[str]] = {}
    for outcome in outcomes:
        if outcome.backend in backends:
            seen.setdefault(outcome.text, set()).add(outcome.backend)
    return sum(1 for found in seen.values() if not both or len(found) == len(set(backends)))


def recent_runs(db: Any, limit: int = 10) -> list[dict[str, Any]]:
    with Session(db) as session:
        rows = session.exec(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)).all()
        return [row.model_dump(mode="json") for row in rows]


def _child_job(config_json: str, trigger: str) -> list[dict[str, Any]]:
    """Entry point in the training process (spawned: a clean interpreter, its own torch threads)."""
    import torch

    config = RouterConfig.model_validate_json(config_json)
    torch.set_num_threads(config.predictors.threads)
    return run_training(config, trigger)


class TrainingScheduler:
    """APScheduler inside the service: runs the job in one worker process, then hot-swaps promoted models."""

    def __init__(
        self, config: RouterConfig, on_trained: Callable[[list[dict[str, Any]]], Any],
        lease: Callable[[str], contextlib.AbstractAsyncContextManager[bool]] | None = None,
    ) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        self.config = config
        self._on_trained = on_trained
        self._lease = lease  # several replicas: runs only while holding it (one trainer at a time)
        self._executor = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        self._running = asyncio.Lock()
        self.scheduler = AsyncIOScheduler(timezone="UTC")
        p = config.predictors
        if p.schedule != "off":
            trigger = IntervalTrigger(minutes=p.interval_minutes) if p.schedule == "interval" else CronTrigger.from_crontab(p.cron, timezone="UTC")
            self.scheduler.add_job(self.run, trigger, kwargs={"trigger": "schedule"}, id="train-predictors",
                                   max_instances=1, coalesce=True, misfire_grace_time=None)

    def start(self) -> None:
        self.scheduler.start()

    async def run(self, trigger: str = "schedule") -> list[dict[str, Any]]:
        """One training run in the worker process; overlapping calls wait for the one in progress. With a
        lease (several replicas), it runs only while holding it: no run ([]) when another replica does."""
        async with self._running:
            if self._lease is None:
                return await self._train(trigger)
            async with self._lease(trigger) as held:
                return await self._train(trigger) if held else []

    async def _train(self, trigger: str) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        runs = await loop.run_in_executor(self._executor, _child_job, self.config.model_dump_json(), trigger)
        await self._on_trained(runs)
        return runs

    def next_run(self) -> str | None:
        job = self.scheduler.get_job("train-predictors")
        return job.next_run_time.isoformat() if job is not None and job.next_run_time else None

    def shutdown(self) -> None:
        """Stop the schedule and the worker; a run in progress is abandoned (its candidate is never promoted)."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        for process in list(getattr(self._executor, "_processes", {}).values()):  # do not wait minutes for a run
            process.terminate()
        self._executor.shutdown(wait=False, cancel_futures=True)
