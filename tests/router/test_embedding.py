"""The fast (ONNX) embedder against the sentence-transformers reference, the static embedder distilled from
MiniLM, the config that picks one, and the request batcher."""

import asyncio
import json
import logging
from pathlib import Path

import numpy as np
import pytest

import router.embedding
from router.config import ConfigError, EmbedderConfig, load_config
from router.embedding import MAX_BATCH, STATIC_DIMS, Embedder, TextBatcher, build_embedder, length_chunks, static_model_dir
from tests.conftest import backend_table, write_config

ROWS = [json.loads(line) for line in (Path(__file__).parents[1] / "data" / "two_kinds.jsonl").open()]
PROMPTS = [row["prompt"] for row in ROWS]
LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 80)  # past the 256-token limit: truncated


@pytest.fixture(scope="module")
def reference() -> Embedder:
    return Embedder(backend="torch")


def top10(vectors: np.ndarray, memory: int = 100) -> np.ndarray:
    """Each query's 10 nearest memory prompts by inner product (exact search, as FAISS's)."""
    return np.argsort(-(vectors[memory:] @ vectors[:memory].T), axis=1)[:, :10]


def test_default_int8_embeddings_stay_faithful_to_the_reference(embedder: Embedder, reference: Embedder) -> None:
    assert (embedder.backend, embedder.dim) == ("onnx", reference.dim)
    assert embedder.name != reference.name  # different vectors must never share a memory
    fast, ref = embedder.embed([*PROMPTS, LONG]), reference.embed([*PROMPTS, LONG])
    cosine = (fast * ref).sum(axis=1)
    assert 0.99 <= cosine.mean() < 0.9999 and cosine.min() >= 0.98  # close, but really quantised
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top10(fast[:-1]), top10(ref[:-1]), strict=True)])
    assert recall >= 0.9


def test_float32_onnx_gives_the_reference_vectors(reference: Embedder) -> None:
    exact = Embedder(quantize=False)
    assert exact.name == reference.name  # same vectors, so the same memory
    cosine = (exact.embed([*PROMPTS, LONG]) * reference.embed([*PROMPTS, LONG])).sum(axis=1)
    assert cosine.min() >= 0.9999


def test_embed_keeps_order_shape_and_unit_norm(embedder: Embedder) -> None:
    texts = [LONG, PROMPTS[0], "hi", PROMPTS[70], ""]
    together = embedder.embed(texts)
    assert together.shape == (len(texts), embedder.dim) and together.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    alone = np.stack([embedder.embed([text])[0] for text in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)  # padding in a batch changes nothing
    assert embedder.embed([]).shape == (0, embedder.dim)


@pytest.fixture(scope="module")
def static() -> Embedder:
    return Embedder(backend="static")  # distilled by `make setup`; distils here (minutes) when it is not cached


def test_static_embedder_gives_unit_vectors_of_its_own_width_and_name(static: Embedder, embedder: Embedder) -> None:
    texts = [LONG, PROMPTS[0], "hi", PROMPTS[70]]
    together = static.embed(texts)
    assert static.dim == STATIC_DIMS and together.shape == (len(texts), STATIC_DIMS) and together.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together, np.stack([static.embed([text])[0] for text in texts]), atol=1e-6)
    assert static.embed([]).shape == (0, STATIC_DIMS)
    # other vectors, so another memory (the store keys rows by name) and other caches (keyed by fingerprint)
    assert static.name != embedder.name and static.fingerprint != embedder.fingerprint
    assert Embedder(backend="static").fingerprint == static.fingerprint  # stable across loads


def test_static_embedder_puts_similar_prompts_nearer_than_unrelated_ones(static: Embedder) -> None:
    capital, paraphrase, code = static.embed(["What is the capital of France?", "Which city is France's capital?",
                                              "Write a python function that reverses a linked list."])
    assert capital @ paraphrase > capital @ code + 0.2
    vectors, kinds = static.embed(PROMPTS), np.array([row["kind"] for row in ROWS])
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    assert np.mean(kinds[similarity.argmax(axis=1)] == kinds) >= 0.95  # a prompt's nearest neighbour is of its kind


def test_static_model_is_distilled_once_per_source_with_a_log_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from router.predictors import build_tiny_backbone

    source = build_tiny_backbone("distilbert", tmp_path / "tiny")  # 32 wide: distils in seconds
    monkeypatch.setattr(router.embedding, "CACHE", tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="llm_router"):
        first = static_model_dir(source)
    assert first.parent == tmp_path / "cache" and (first / "model.safetensors").is_file()
    assert any("distilling a static embedder" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llm_router"):
        assert static_model_dir(source) == first
    assert not caplog.records  # cached: no second distillation
    tiny = Embedder(str(source), backend="static")
    assert (tiny.dim, tiny.name) == (32, "tiny-32-static")


def test_config_picks_the_embedder(tmp_path: Path) -> None:
    assert load_config(environ={}).embedder.kind == "transformer"  # MiniLM stays the default
    backends = backend_table("a", 18001, 0.1, 0.2)
    file = write_config(tmp_path / "router.toml", "sqlite:///router.db", backends, extra='[embedder]\nkind = "static"')
    assert load_config(file, environ={}).embedder.kind == "static"
    assert load_config(environ={"LLM_ROUTER_EMBEDDER__KIND": "static"}).embedder.kind == "static"
    file = write_config(tmp_path / "router.toml", "sqlite:///router.db", backends, extra='[embedder]\nkind = "glove"')
    with pytest.raises(ConfigError, match="embedder.kind"):
        load_config(file, environ={})
    assert build_embedder(EmbedderConfig(kind="static")).backend == "static"
    assert build_embedder(EmbedderConfig()).backend == "onnx"


def test_length_chunks_cover_every_index_once_with_similar_lengths() -> None:
    lengths = [300, 12, 30, 13, 256, 40, *([20] * 100)]
    chunks = length_chunks(lengths)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(lengths)))
    for chunk in chunks:
        sizes = [lengths[i] for i in chunk]
        assert len(chunk) <= MAX_BATCH and max(sizes) <= 2 * max(min(sizes), 8)
    assert [len(chunk) for chunk in chunks] == [64, 40, 2]  # [12, 13, 20 x62], [20 x38, 30, 40], [256, 300]


class Counting:
    """An embedder that records the batch sizes it was called with."""

    def __init__(self, inner: Embedder, fail: bool = False) -> None:
        self.inner, self.fail, self.calls = inner, fail, []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        if self.fail:
            raise RuntimeError("encoder broke")
        return self.inner.embed(texts)


async def test_batcher_batches_requests_that_arrive_during_an_encode(embedder: Embedder) -> None:
    counting = Counting(embedder)
    batcher = TextBatcher(counting.embed)
    try:
        texts = PROMPTS[:40]
        first = asyncio.create_task(batcher.one(texts[0]))
        await asyncio.sleep(0)  # the first request reaches the encoder alone, without waiting for company
        rest = await asyncio.gather(*(batcher.one(text) for text in texts[1:]))
        vectors = np.stack([await first, *rest])
        assert counting.calls == [1, len(texts) - 1]  # the others queued behind it and went as one batch
        np.testing.assert_allclose(vectors, np.stack([embedder.embed([t])[0] for t in texts]), atol=1e-5)
    finally:
        batcher.close()


async def test_batcher_splits_at_max_batch(embedder: Embedder) -> None:
    counting = Counting(embedder)
    batcher = TextBatcher(counting.embed, max_batch=8)
    try:
        vectors = await asyncio.gather(*(batcher.one(text) for text in PROMPTS[:20]))
        assert counting.calls == [8, 8, 4] and len(vectors) == 20
    finally:
        batcher.close()


async def test_batcher_passes_errors_to_every_caller_and_recovers(embedder: Embedder) -> None:
    counting = Counting(embedder, fail=True)
    batcher = TextBatcher(counting.embed)
    try:
        results = await asyncio.gather(*(batcher.one(t) for t in PROMPTS[:5]), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        counting.fail = False
        assert (await batcher.one(PROMPTS[0])).shape == (embedder.dim,)
    finally:
        batcher.close()
