"""FAISS memory of past routed queries: the k nearest past decisions, with their feedback.

The database is the source of truth (every embedding is stored there); this index is rebuilt from it
at start, so memory survives restarts without a second file to keep consistent.

The index is chosen by size: exact inner product (`IndexFlatIP`) while the memory is small, and an
inverted-file index with half-precision vectors (`IndexIVFScalarQuantizer`, fp16) once it holds more
than `exact_up_to` queries: exact search costs O(n) per query (about 40 ms at a million MiniLM
vectors on one core), IVF scans `nprobe` of its lists, and fp16 halves the vectors' memory. The switch
happens as the memory grows (the lists are trained on what it holds then) and at start from the
database's rows. A bound (`max_entries`) keeps the newest queries: past it, the oldest are forgotten
in chunks, so removal (linear in the index size) is rare.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from policies import Neighbour
from router.config import MemoryConfig

# One query at a time: OpenMP threads only add wake-up latency (10+ ms on a busy 2-core machine).
faiss.omp_set_num_threads(1)

TRAIN_POINTS_PER_LIST = 32  # k-means sample per IVF list
EVICT_FRACTION = 0.01  # past the bound, forget this share of the memory at once (removal scans the whole index)


def lists_for(size: int) -> int:
    """IVF lists for a memory of `size` queries: about sqrt(n), so a list holds about as many as there are lists."""
    return int(min(max(math.sqrt(size), 64), 1024))


@dataclass(slots=True)
class MemoryEntry:
    decision_id: str
    backend: str
    reward: float | None = None
    preference: tuple[str, str] | None = None
    output_tokens: float | None = None


class Memory:
    def __init__(self, dim: int, settings: MemoryConfig | None = None) -> None:
        self.dim = dim
        self.settings = settings or MemoryConfig()
        self._index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._exact = True
        self._quantizer: faiss.Index | None = None  # IVF: its coarse quantizer
        self._entries: dict[int, MemoryEntry] = {}
        self._by_decision: dict[str, int] = {}
        self._order: deque[int] = deque()  # memory ids, oldest first (for the bound)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def index_kind(self) -> str:
        return "exact" if self._exact else f"ivf{self._index.nlist}-fp16"

    def add(self, memory_ids: np.ndarray, vectors: np.ndarray, entries: list[MemoryEntry]) -> None:
        if len(memory_ids) == 0:
            return
        ids = np.asarray(memory_ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self._exact and len(self._entries) + len(ids) > self.settings.exact_up_to:
            self._to_ivf(ids, vectors)
        else:
            self._index.add_with_ids(vectors, ids)
        self._remember(ids, entries)
        self._bound()

    def _remember(self, ids: np.ndarray, entries: list[MemoryEntry]) -> None:
        for memory_id, entry in zip(ids.tolist(), entries):
            self._entries[memory_id] = entry
            self._by_decision[entry.decision_id] = memory_id
            self._order.append(memory_id)

    def load(self, total: int, batches: Iterator[tuple[np.ndarray, np.ndarray, list[MemoryEntry]]]) -> None:
        """Fill an empty memory from the database at start: `total` queries, oldest first. Past
        `exact_up_to`, the IVF lists are trained on the first batches and the rest streams in, so the
        float32 vectors are never all held at once."""
        pending: list[tuple[np.ndarray, np.ndarray, list[MemoryEntry]]] = []
        held = 0
        for batch in batches:
            if self._exact and total > self.settings.exact_up_to and held < TRAIN_POINTS_PER_LIST * lists_for(total):
                pending.append(batch)
                held += len(batch[0])
                continue
            if pending:
                self._train(total, *pending)
                pending = []
            self.add(*batch)
        if pending:
            self._train(total, *pending)

    def _train(self, total: int, *batches: tuple[np.ndarray, np.ndarray, list[MemoryEntry]]) -> None:
        ids = np.concatenate([b[0] for b in batches]).astype(np.int64)
        vectors = np.ascontiguousarray(np.concatenate([b[1] for b in batches]), dtype=np.float32)
        self._to_ivf(ids, vectors, lists_for(total))
        for batch in batches:
            self._remember(batch[0], batch[2])

    def _to_ivf(self, ids: np.ndarray, vectors: np.ndarray, nlist: int | None = None) -> None:
        """Move to an IVF index trained on everything held so far plus `vectors` (about sqrt(n) lists,
        k-means on at most 32 points per list, 10 rounds: a few seconds at a million, on every core)."""
        if self._entries:
            held = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            ids = np.concatenate([held, ids])
            vectors = np.concatenate([self._index.index.reconstruct_n(0, len(held)), vectors])
        nlist = nlist or lists_for(len(ids))
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter, index.cp.max_points_per_centroid, index.cp.seed = 10, TRAIN_POINTS_PER_LIST, 0
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        try:
            index.train(vectors)
            index.add_with_ids(vectors, ids)
        finally:
            faiss.omp_set_num_threads(1)
        index.nprobe = self.settings.nprobe
        self._index, self._quantizer, self._exact = index, quantizer, False  # the quantizer must outlive the index

    def _bound(self) -> None:
        limit = self.settings.max_entries
        if not limit or len(self._entries) <= limit:
            return
        excess = len(self._entries) - limit + int(limit * EVICT_FRACTION)
        old = [self._order.popleft() for _ in range(min(excess, len(self._order)))]
        self._index.remove_ids(np.array(old, dtype=np.int64))
        for memory_id in old:
            entry = self._entries.pop(memory_id, None)
            if entry is not None:
                self._by_decision.pop(entry.decision_id, None)

    def remove(self, decision_id: str) -> None:
        """Forget a decision (one whose write failed, so the database never had it)."""
        memory_id = self._by_decision.pop(decision_id, None)
        if memory_id is not None:
            del self._entries[memory_id]
            self._index.remove_ids(np.array([memory_id], dtype=np.int64))
            if self._order and self._order[-1] == memory_id:  # the usual case: the newest
                self._order.pop()
            else:
                self._order.remove(memory_id)

    def entry(self, decision_id: str) -> MemoryEntry | None:
        """The mutable record of a decision: set its backend, reward, preference or output length."""
        memory_id = self._by_decision.get(decision_id)
        return None if memory_id is None else self._entries[memory_id]

    def search(self, vector: np.ndarray, k: int) -> tuple[Neighbour, ...]:
        if k <= 0 or not self._entries:
            return ()
        similarities, ids = self._index.search(vector.reshape(1, -1), min(k, len(self._entries)))
        neighbours = []
        for similarity, memory_id in zip(similarities[0].tolist(), ids[0].tolist()):
            entry = self._entries.get(memory_id)
            if entry is not None:
                neighbours.append(
                    Neighbour(entry.decision_id, entry.backend, similarity, entry.reward, entry.preference, entry.output_tokens)
                )
        return tuple(neighbours)
