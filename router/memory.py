"""FAISS memory of past routed queries: the k nearest past decisions, with their rewards.

The database is the source of truth (every embedding is stored there); this index is rebuilt from it
at start, so memory survives restarts without a second file to keep consistent.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from policies import Neighbour


@dataclass(slots=True)
class _Entry:
    decision_id: str
    backend: str
    reward: float | None


class Memory:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._entries: dict[int, _Entry] = {}
        self._by_decision: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, memory_ids: np.ndarray, vectors: np.ndarray, decisions: list[tuple[str, str, float | None]]) -> None:
        """Add vectors with their ids and (decision id, backend, reward) rows."""
        if len(memory_ids) == 0:
            return
        self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(memory_ids, dtype=np.int64))
        for memory_id, (decision_id, backend, reward) in zip(memory_ids.tolist(), decisions):
            self._entries[memory_id] = _Entry(decision_id, backend, reward)
            self._by_decision[decision_id] = memory_id

    def set_backend(self, decision_id: str, backend: str) -> None:
        """A failover moved the decision to another backend: neighbours must show the one that answered."""
        memory_id = self._by_decision.get(decision_id)
        if memory_id is not None:
            self._entries[memory_id].backend = backend

    def set_reward(self, decision_id: str, reward: float) -> None:
        memory_id = self._by_decision.get(decision_id)
        if memory_id is not None:
            self._entries[memory_id].reward = reward

    def search(self, vector: np.ndarray, k: int) -> tuple[Neighbour, ...]:
        if k <= 0 or not self._entries:
            return ()
        similarities, ids = self._index.search(vector.reshape(1, -1), min(k, len(self._entries)))
        neighbours = []
        for similarity, memory_id in zip(similarities[0].tolist(), ids[0].tolist()):
            entry = self._entries.get(memory_id)
            if entry is not None:
                neighbours.append(Neighbour(entry.decision_id, entry.backend, similarity, entry.reward))
        return tuple(neighbours)
