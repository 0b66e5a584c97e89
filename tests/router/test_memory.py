"""The FAISS memory: exact while small, IVF past its bound on exact search, the newest queries kept."""

import asyncio

import numpy as np
import pytest

from router.config import MemoryConfig
from router.memory import Memory, MemoryEntry
from router.store import Batched, GroupWriter, Store, add_decisions
from tests.router.test_store import _decision

DIM = 32


def _clustered(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, DIM))
    vectors = centres[rng.integers(0, 40, size=count)] + rng.normal(size=(count, DIM)) * 0.3
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def _entries(ids: np.ndarray) -> list[MemoryEntry]:
    return [MemoryEntry(f"d{i}", "a") for i in ids.tolist()]


def _exact(vectors: np.ndarray, probe: np.ndarray, k: int) -> set[str]:
    return {f"d{i}" for i in np.argsort(-(vectors @ probe))[:k].tolist()}


def test_past_its_exact_bound_the_memory_moves_to_ivf_and_still_finds_the_neighbours():
    vectors = _clustered(3000)
    memory = Memory(DIM, MemoryConfig(exact_up_to=1000, nprobe=8))
    for start in range(0, 3000, 250):  # grows as a serving router's does
        ids = np.arange(start, start + 250)
        memory.add(ids, vectors[start:start + 250], _entries(ids))
    assert memory.index_kind.startswith("ivf") and len(memory) == 3000
    probes = _clustered(50, seed=1)
    found = sum(len(_exact(vectors, p, 10) & {n.decision_id for n in memory.search(p, 10)}) for p in probes)
    assert found / 500 >= 0.9
    memory.entry("d5").reward = 0.75
    memory.remove("d7")
    assert memory.entry("d7") is None and len(memory) == 2999
    near5 = memory.search(vectors[5], 3)
    assert near5[0].decision_id == "d5" and near5[0].reward == 0.75
    assert "d7" not in {n.decision_id for n in memory.search(vectors[7], 10)}


def test_loaded_at_start_it_trains_once_on_the_first_batches_and_streams_the_rest():
    vectors = _clustered(5000, seed=2)
    memory = Memory(DIM, MemoryConfig(exact_up_to=1000))
    batches = ((np.arange(s, s + 500), vectors[s:s + 500], _entries(np.arange(s, s + 500))) for s in range(0, 5000, 500))
    memory.load(5000, batches)
    assert memory.index_kind == "ivf70-fp16", "lists for the whole load (sqrt of 5000), not for its first batch"
    assert len(memory) == 5000 and memory.search(vectors[4321], 1)[0].decision_id == "d4321"


def test_the_bound_keeps_the_newest_queries():
    vectors = _clustered(600, seed=3)
    memory = Memory(DIM, MemoryConfig(max_entries=500))
    for start in range(0, 600, 100):
        ids = np.arange(start, start + 100)
        memory.add(ids, vectors[start:start + 100], _entries(ids))
    assert 490 <= len(memory) <= 500, "past the bound, the oldest go (a few more at once)"
    assert memory.entry("d0") is None and memory.entry("d99") is None and memory.entry("d599") is not None
    assert all(int(n.decision_id[1:]) >= 100 for p in vectors[:20] for n in memory.search(p, 10))


@pytest.mark.parametrize("url", ["sqlite_url", "pg_url"])
async def test_a_restart_remembers_only_the_newest_decisions_of_a_long_log(request, url):
    from router.db import create_db_engine, migrate

    engine = create_db_engine(request.getfixturevalue(url))
    migrate(engine)
    writer = GroupWriter(engine)
    for i in range(12):  # one at a time: each its own commit, so their times are in this order
        await writer.submit(Batched(add_decisions, _decision(i)))
        await asyncio.sleep(0.002)
    await writer.close()
    total, batches = Store(engine).memory_rows("test", newest=5, batch=2)
    memory = Memory(4)
    memory.load(total, batches)
    engine.dispose()
    assert total == 5 and sorted(memory.entry(f"d{i}") is not None for i in range(12)) == [False] * 7 + [True] * 5
    assert all(memory.entry(f"d{i}") is not None for i in range(7, 12))
