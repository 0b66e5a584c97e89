"""Trained models on disk: `root/<kind>/v0001/` (weights, encoder config, tokenizer, predictor.json and
metadata.json) and `root/<kind>/current`, a pointer file naming the version in use.

A version is written in a temporary directory and renamed into place, and the pointer is replaced
atomically, so a crash never leaves a half-written version that `load_current` would load. A model that
cannot be loaded is refused with a warning, never raised into the caller: routing goes on without it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

from pydantic import BaseModel

from router.predictors.models import (
    ENCODER_DIR,
    PREDICTOR_FILE,
    WEIGHTS_FILE,
    ForcConfig,
    ForcPredictor,
    HybridConfig,
    HybridPredictor,
    Kind,
    Predictor,
    StrictModel,
)
from router.predictors.scorer import AnswerScorer, ScorerConfig
from router.predictors.training import SampleCounts, TrainingResult, TrainSettings

log = logging.getLogger("llm_router")

METADATA_FILE = "metadata.json"
POINTER_FILE = "current"
VERSION_NAME = re.compile(r"^v(\d{4,})$")


class ArtifactMetadata(StrictModel):
    """What `metadata.json` records about a saved model and its training."""

    kind: Kind
    version: int
    created_at: float  # unix seconds
    samples: SampleCounts
    validation_loss: float
    baseline_loss: float
    backbone: str
    settings: TrainSettings
    duration_s: float
    predictor: ForcConfig | HybridConfig | ScorerConfig  # backends, small/large/tolerance/threshold/large_share, or the scorer's


@dataclass(frozen=True)
class Version:
    kind: Kind
    number: int
    path: Path

    @property
    def name(self) -> str:
        return f"v{self.number:04d}"


class ArtifactStore:
    """Versioned model directories with a `current` pointer per kind."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def versions(self, kind: Kind) -> list[Version]:
        folder = self.root / kind
        if not folder.is_dir():
            return []
        numbers = sorted(int(match.group(1)) for path in folder.iterdir() if (match := VERSION_NAME.match(path.name)))
        return [self._version(kind, number) for number in numbers]

    def metadata(self, version: Version) -> ArtifactMetadata:
        return ArtifactMetadata.model_validate_json((version.path / METADATA_FILE).read_text())

    def save_candidate(
        self, result: TrainingResult[ForcPredictor] | TrainingResult[HybridPredictor] | TrainingResult[AnswerScorer]
    ) -> Version:
        """Write the model as the next version (not promoted)."""
        kind = result.predictor.kind

        def metadata(number: int) -> ArtifactMetadata:
            return ArtifactMetadata(
                kind=kind, version=number, created_at=time.time(), samples=result.samples,
                validation_loss=result.validation_loss, baseline_loss=result.baseline_loss,
                backbone=result.backbone, settings=result.settings, duration_s=result.duration_s,
                predictor=result.predictor.config,
            )

        return self.save_version(kind, result.predictor.save, metadata)

    def save_version(self, kind: str, write: Callable[[Path], None], metadata: Callable[[int], BaseModel]) -> Version:
        """Write a model (`write` fills a scratch directory) and its metadata as the next version of `kind`,
        atomically (scratch directory, fsync, rename); not promoted."""
        folder = self.root / kind
        folder.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
        try:
            write(scratch)
            number = max((version.number for version in self.versions(kind)), default=0) + 1  # type: ignore[arg-type]
            while True:  # a concurrent writer may take the number first: the rename then fails, take the next
                (scratch / METADATA_FILE).write_text(metadata(number).model_dump_json(indent=1))
                _fsync_tree(scratch)
                version = self._version(kind, number)  # type: ignore[arg-type]
                try:
                    os.rename(scratch, version.path)
                except OSError:
                    if not version.path.exists():
                        raise
                    number += 1
                    continue
                _fsync_directory(folder)
                return version
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def promote(self, version: Version) -> None:
        """Point `current` at `version` (written to a temporary file, synced, then renamed over the pointer)."""
        if not (version.path / METADATA_FILE).is_file():
            raise ValueError(f"{version.path} is not a saved version")
        folder = version.path.parent
        descriptor, partial = tempfile.mkstemp(prefix=".current-", dir=folder)
        try:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(version.name + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, folder / POINTER_FILE)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        _fsync_directory(folder)

    def current(self, kind: Kind) -> Version | None:
        """The version the pointer names (which may be missing or broken: `load_current` checks)."""
        pointer = self.root / kind / POINTER_FILE
        if not pointer.is_file():
            return None
        match = VERSION_NAME.match(pointer.read_text(errors="replace").strip())
        if match is None:
            log.warning("%s does not name a version; no current %s model", pointer, kind)
            return None
        return self._version(kind, int(match.group(1)))

    @overload
    def load_current(self, kind: Literal["forc"], backends: Collection[str] | None = None) -> ForcPredictor | None: ...
    @overload
    def load_current(self, kind: Literal["hybrid"], backends: Collection[str] | None = None) -> HybridPredictor | None: ...
    @overload
    def load_current(self, kind: Literal["scorer"], backends: Collection[str] | None = None) -> AnswerScorer | None: ...

    def load_current(self, kind: Kind, backends: Collection[str] | None = None) -> Predictor | AnswerScorer | None:
        """The current model, or None if none was promoted, or (with a WARNING saying why) if it cannot be used.

        `backends`: those the caller routes between; a FORC model that does not score them all, or a Hybrid
        model whose small or large backend is not among them, is refused. A scorer scores any backend's answers.
        """
        version = self.current(kind)
        if version is None:
            return None
        part = METADATA_FILE
        try:
            metadata = self.metadata(version)
            if (metadata.kind, metadata.version) != (kind, version.number):
                raise ValueError(f"it describes {metadata.kind} v{metadata.version}")
            part = f"{PREDICTOR_FILE}, {WEIGHTS_FILE} or {ENCODER_DIR}/"
            loader = {"forc": ForcPredictor, "hybrid": HybridPredictor, "scorer": AnswerScorer}[kind]
            predictor: Predictor | AnswerScorer = loader.load(version.path)
            if predictor.config != metadata.predictor:
                raise ValueError(f"{PREDICTOR_FILE} and {METADATA_FILE} disagree")
        except Exception as exc:  # noqa: BLE001 - any unreadable artifact means "no model", never a crash
            log.warning("cannot load %s model %s: %s: %s: %s", kind, version.path, part, type(exc).__name__, exc)
            return None
        if backends is not None and (mismatch := _backend_mismatch(predictor, set(backends))):
            log.warning("cannot use %s model %s: %s", kind, version.path, mismatch)
            return None
        return predictor

    def _version(self, kind: Kind, number: int) -> Version:
        return Version(kind, number, self.root / kind / f"v{number:04d}")


def _backend_mismatch(predictor: Predictor | AnswerScorer, backends: set[str]) -> str | None:
    if isinstance(predictor, AnswerScorer):
        return None
    if isinstance(predictor, ForcPredictor):
        missing = backends - set(predictor.backends)
        return f"it does not score backends {sorted(missing)}" if missing else None
    unknown = {predictor.small, predictor.large} - backends
    return f"its backends {sorted(unknown)} are not among {sorted(backends)}" if unknown else None


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        else:
            _fsync_directory(path)
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
