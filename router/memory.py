"""FAISS memory of past routed queries: the k nearest past decisions, with their feedback.

The database is the source of truth (every embedding is stored there); this index is rebuilt from it
at start, so memory survives restarts without a second file to keep consistent.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from policies import Neighbour

# One query at a time: OpenMP threads only add wake-up latency (10+ ms on a busy 2-core machine).
faiss.omp_set_num_threads(1)


@dataclass(slots=True)
class MemoryEntry:
    decision_id: str
    backend: str
    reward: float | None = None
    preference: tuple[str, str] | None = None
    output_tokens: float | None = None


class Memory:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._entries: dict[int, MemoryEntry] = {}
        self._by_decision: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, memory_ids: np.ndarray, vectors: np.ndarray, entries: list[MemoryEntry]) -> None:
        if len(memory_ids) == 0:
            return
        self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(memory_ids, dtype=np.int64))
        for memory_id, entry in zip(np.asarray(memory_ids).tolist(), entries):
            self._entries[memory_id] = entry
            self._by_decision[entry.decision_id] = memory_id

    def remove(self, decision_id: str) -> None:
        """Forget a decision (one whose write failed, so the database never had it)."""
        memory_id = self._by_decision.pop(decision_id, None)
        if memory_id is not None:
            del self._entries[memory_id]
            self._index.remove_ids(np.array([memory_id], dtype=np.int64))

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
