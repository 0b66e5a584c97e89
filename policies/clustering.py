"""Which region of the embedding space a query falls in, so per-arm learners are not blind to the query.

`kmeans`: online spherical k-means (MacQueen): the first k distinct queries seed the centroids, each
later query joins the centroid nearest in direction (cosine) and moves it by 1/count. By direction, not by
Euclidean distance: a centroid is a mean of unit vectors, shorter the more its members differ, and a
short one is near everything in Euclidean terms, so it swallowed the stream (on llmrouter's 5,989 MiniLM
embeddings one of 16 clusters took 3,900 queries of nine unrelated tasks, eight clusters kept one each).
`faiss`: FAISS k-means fitted once on the first `warmup` queries, fixed afterwards (stable cluster ids).
One cluster reproduces the context-free PickLLM learners.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from policies.base import PolicyError


class QueryClusters:
    def __init__(self, n_clusters: int = 1, method: Literal["kmeans", "faiss"] = "kmeans", warmup: int = 256, seed: int | None = None) -> None:
        if n_clusters < 1:
            raise PolicyError(f"clusters must be >= 1, got {n_clusters}")
        if method not in ("kmeans", "faiss"):
            raise PolicyError(f"clustering must be 'kmeans' or 'faiss', got {method!r}")
        self.n_clusters = n_clusters
        self.method = method
        self.warmup = max(warmup, n_clusters)
        self.seed = seed
        self._centroids: np.ndarray | None = None
        self._counts = np.zeros(n_clusters, dtype=np.int64)
        self._pending: list[np.ndarray] = []  # faiss: queries seen before the fit

    def assign(self, embedding: np.ndarray) -> int:
        """Nearest centroid (0 while there is nothing to compare with). Does not change state."""
        if self.n_clusters == 1 or self._centroids is None or len(self._centroids) == 0:
            return 0
        if self.method == "kmeans":  # spherical: by direction (see the module docstring)
            norms = np.linalg.norm(self._centroids, axis=1)
            return int(np.argmax(self._centroids @ np.asarray(embedding, dtype=np.float32) / np.maximum(norms, 1e-12)))
        distances = ((self._centroids - embedding) ** 2).sum(axis=1)
        return int(np.argmin(distances))

    def observe(self, embedding: np.ndarray) -> int:
        """Assign and let the clustering learn from this query; returns the cluster id."""
        if self.n_clusters == 1:
            return 0
        vector = np.asarray(embedding, dtype=np.float32)
        if self.method == "faiss":
            return self._observe_faiss(vector)
        if self._centroids is None:
            self._centroids = vector.reshape(1, -1).copy()
            self._counts[0] = 1
            return 0
        if len(self._centroids) < self.n_clusters:
            if float(((self._centroids - vector) ** 2).sum(axis=1).min()) > 1e-6:
                index = len(self._centroids)
                self._centroids = np.vstack([self._centroids, vector])
                self._counts[index] = 1
                return index
        index = self.assign(vector)
        self._counts[index] += 1
        self._centroids[index] += (vector - self._centroids[index]) / self._counts[index]
        return index

    def _observe_faiss(self, vector: np.ndarray) -> int:
        if self._centroids is None:
            self._pending.append(vector)
            if len(self._pending) < self.warmup:
                return 0
            import faiss

            data = np.stack(self._pending).astype(np.float32)
            kmeans = faiss.Kmeans(data.shape[1], self.n_clusters, niter=20, seed=self.seed or 1234, verbose=False)
            kmeans.train(data)
            self._centroids = kmeans.centroids.copy()
            self._pending = []
        index = self.assign(vector)
        self._counts[index] += 1
        return index

    def snapshot(self) -> dict[str, Any]:
        return {
            "centroids": None if self._centroids is None else self._centroids.tolist(),
            "counts": self._counts.tolist(),
            "pending": [v.tolist() for v in self._pending],
        }

    def restore(self, state: dict[str, Any]) -> None:
        self._centroids = None if state["centroids"] is None else np.array(state["centroids"], dtype=np.float32)
        self._counts = np.array(state["counts"], dtype=np.int64)
        self._pending = [np.array(v, dtype=np.float32) for v in state["pending"]]

    def stats(self) -> dict[str, Any]:
        return {"clusters": self.n_clusters, "method": self.method, "queries_per_cluster": self._counts.tolist()}
