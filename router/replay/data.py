"""Routing outcome files (the format of `shared/data/README.md`) and their cached prompt embeddings."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policies import Arm
from router.progress import bar

EMBED_CHUNK = 512  # prompts per embedder call: one step of the progress bar


@dataclass(frozen=True)
class Outcome:
    quality: float
    cost_usd: float
    output_tokens: float | None


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    prompt_tokens: int
    outcomes: dict[str, Outcome]


@dataclass
class Dataset:
    """Prompts with every model's recorded outcome; `models` are the candidates with their prices."""

    name: str
    prompts: list[Prompt]
    models: list[Arm]

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]


class DatasetError(ValueError):
    pass


def load_dataset(path: str | Path, models: list[str] | None = None) -> Dataset:
    """A routing file (`*_routing.jsonl`) and, when present, its `*_models.json` with prices.

    Without a models file, each model's price per token is inferred from its recorded costs.
    """
    path = Path(path)
    prompts = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                outcomes = {
                    name: Outcome(float(o["quality"]), float(o["cost_usd"]), None if o.get("output_tokens") is None else float(o["output_tokens"]))
                    for name, o in row["outcomes"].items()
                }
                prompts.append(Prompt(str(row["id"]), row["prompt"], int(row["prompt_tokens"]), outcomes))
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetError(f"{path}:{number}: not a routing record ({exc})") from exc
    if not prompts:
        raise DatasetError(f"{path}: no records")
    names = list(prompts[0].outcomes)
    if models:
        unknown = [m for m in models if m not in names]
        if unknown:
            raise DatasetError(f"models {unknown} not in {path.name}; it has {names}")
        names = models
    missing = [p.id for p in prompts if any(n not in p.outcomes for n in names)]
    if missing:
        raise DatasetError(f"{path}: {len(missing)} records lack an outcome for some model (e.g. {missing[0]})")
    return Dataset(path.name, prompts, _prices(path, prompts, names))


def _prices(path: Path, prompts: list[Prompt], names: list[str]) -> list[Arm]:
    models_file = path.with_name(path.name.replace("_routing.jsonl", "_models.json"))
    known: dict[str, Arm] = {}
    if models_file.exists() and models_file != path:
        for model in json.loads(models_file.read_text()).get("models", []):
            known[model["name"]] = Arm(model["name"], float(model["price_per_1m_input_tokens_usd"]), float(model["price_per_1m_output_tokens_usd"]))
    candidates = []
    for name in names:
        if name in known:
            candidates.append(known[name])
            continue
        per_token = [p.outcomes[name].cost_usd / max(p.prompt_tokens + (p.outcomes[name].output_tokens or 0), 1) for p in prompts]
        price = float(np.median(per_token)) * 1e6
        candidates.append(Arm(name, price, price))
    return candidates


def answers_file(path: str | Path) -> Path:
    """The answers file beside a routing file: `X_routing.jsonl` -> `X_answers.jsonl` (`X.jsonl` -> `X_answers.jsonl`)."""
    path = Path(path)
    stem = path.name.removesuffix(".jsonl").removesuffix("_routing")
    return path.with_name(f"{stem}_answers.jsonl")


def load_answers(path: str | Path, dataset: Dataset) -> list[dict[str, str]]:
    """Per prompt of `dataset` (in its order), each model's answer text, from the answers file beside the
    routing file `path` (format in shared/data/README.md). Every prompt needs an answer of every model."""
    source = answers_file(path)
    if not source.is_file():
        raise DatasetError(f"{Path(path).name}: no answers file beside it ({source.name}); answer-aware modes need one")
    by_id: dict[str, dict[str, str]] = {}
    for number, line in enumerate(source.read_text().split("\n"), 1):  # not splitlines: answers may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_id[str(row["id"])] = {str(model): str(text) for model, text in row["answers"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DatasetError(f"{source}:{number}: not an answers record ({exc})") from exc
    names = dataset.model_names
    missing = [p.id for p in dataset.prompts if p.id not in by_id or any(n not in by_id[p.id] for n in names)]
    if missing:
        raise DatasetError(f"{source}: {len(missing)} prompts lack an answer of some model (e.g. {missing[0]})")
    return [{n: by_id[p.id][n] for n in names} for p in dataset.prompts]


def output_tokens(outcome: Outcome, prompt: Prompt, price: Arm) -> float:
    """Recorded answer length, or the length the recorded cost implies (data that bills input only -> 0)."""
    if outcome.output_tokens is not None:
        return outcome.output_tokens
    if price.price_per_1m_output_tokens_usd <= 0:
        return 0.0
    output_cost = outcome.cost_usd - prompt.prompt_tokens * price.price_per_1m_input_tokens_usd / 1e6
    return max(0.0, output_cost * 1e6 / price.price_per_1m_output_tokens_usd)


def embedding_cache_file(dataset_path: str | Path, dataset: Dataset, embedder: Any, cache_dir: Path) -> Path:
    """Where a dataset's embeddings are cached: keyed by the embedder's fingerprint (its weights and
    settings, not only its name) and by the prompts' content."""
    digest = hashlib.sha256("\x1e".join(p.prompt for p in dataset.prompts).encode()).hexdigest()[:16]
    return cache_dir / f"{Path(dataset_path).stem}-{embedder.name}-{embedder.fingerprint[:16]}-{digest}.npy"


def embed_dataset(dataset_path: str | Path, dataset: Dataset, embedder: Any, cache_dir: Path) -> np.ndarray:
    """Embeddings of every prompt, computed once per (embedder fingerprint, content) and cached on disk."""
    cache = embedding_cache_file(dataset_path, dataset, embedder, cache_dir)
    if cache.exists():
        return np.load(cache)
    texts = [p.prompt for p in dataset.prompts]
    parts = []
    with bar("embedding prompts", len(texts), unit="prompt") as update:
        for start in range(0, len(texts), EMBED_CHUNK):
            parts.append(embedder.embed(texts[start : start + EMBED_CHUNK]))
            update(len(parts[-1]))
    vectors = np.concatenate(parts)  # a dataset has at least one prompt (load_dataset)
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(".tmp.npy")
    np.save(temporary, vectors)
    temporary.rename(cache)
    return vectors
