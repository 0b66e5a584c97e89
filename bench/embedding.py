"""Embedding benchmark: the sentence-transformers reference against the fast ONNX path (int8 weights, the
default, and float32) and the static model distilled from MiniLM (`[embedder] kind = "static"`).

Run from the repository root (a few minutes; the shared routing data must lie in ../shared/data):

    .venv/bin/python bench/embedding.py
    .venv/bin/python bench/embedding.py --rounds 5 --memory 2000 --queries 200 --threads 1

For each embedder it prints, as medians over `--rounds` interleaved rounds (the machine may be busy):
- single-query latency p50/p99 (`embed([text])`, one call at a time) on tests/data/two_kinds.jsonl, the
  prompts that bench/overhead.py sends to /v1/route;
- throughput in texts/s of `embed` on batches of 32, and of `TextBatcher.one` driven by 32
  concurrent callers (the router's path at concurrency 32).
Then, for each other embedder, fidelity on real prompts from ../shared/data/*_routing.jsonl: cosine(fast, reference)
over the memory and query prompts (ONNX variants only: the static model's vectors live in another space), and
neighbour recall@10: the share of each query's 10 nearest memory prompts (inner product on unit vectors, as
FAISS) under the reference that this embedder also finds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from router.embedding import Embedder, TextBatcher  # noqa: E402  (after the offline switch)

CONCURRENCY = 32


def latencies_ms(embedder: Embedder, texts: list[str]) -> list[float]:
    out = []
    for text in texts:
        started = time.perf_counter()
        embedder.embed([text])
        out.append((time.perf_counter() - started) * 1000)
    return out


def batched_per_s(embedder: Embedder, texts: list[str]) -> float:
    started = time.perf_counter()
    for i in range(0, len(texts), CONCURRENCY):
        embedder.embed(texts[i : i + CONCURRENCY])
    return len(texts) / (time.perf_counter() - started)


async def batcher_per_s(embedder: Embedder, texts: list[str]) -> float:
    """`CONCURRENCY` callers, each sending its next text as soon as its last one is answered."""
    batcher = TextBatcher(embedder.embed)
    queue = list(reversed(texts))

    async def caller() -> None:
        while queue:
            await batcher.one(queue.pop())

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
    batcher.close()
    return len(texts) / (time.perf_counter() - started)


def recall_at_10(fast: np.ndarray, ref: np.ndarray, memory: int) -> float:
    def top(vectors: np.ndarray) -> np.ndarray:
        return np.argsort(-(vectors[memory:] @ vectors[:memory].T), axis=1)[:, :10]

    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top(fast), top(ref), strict=True)]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", type=int, default=2000, help="memory prompts for recall")
    parser.add_argument("--queries", type=int, default=200, help="query prompts for recall")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: the Embedder's)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in seconds (tests/bench/test_quick.py): 1 round, 8 prompts, tests/data for fidelity")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.memory, args.queries, args.data = 1, 20, 5, ROOT / "tests" / "data"

    embedders = {
        "reference": Embedder(backend="torch"),
        "fast": Embedder(threads=args.threads),
        "fast-fp32": Embedder(quantize=False, threads=args.threads),
        "static": Embedder(backend="static"),
    }
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "tests" / "data" / "two_kinds.jsonl").open()]
    if args.quick:
        prompts = prompts[:8]
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start", flush=True)

    figures: dict[str, dict[str, list[float]]] = {name: {"p50": [], "p99": [], "batch": [], "batcher": []} for name in embedders}
    for embedder in embedders.values():
        embedder.embed(prompts[:8])  # warm-up
    for round_ in range(args.rounds):
        order = list(embedders.items())
        random.Random(round_).shuffle(order)
        for name, embedder in order:
            times = latencies_ms(embedder, prompts)
            figures[name]["p50"].append(float(np.percentile(times, 50)))
            figures[name]["p99"].append(float(np.percentile(times, 99)))
            figures[name]["batch"].append(batched_per_s(embedder, prompts))
            figures[name]["batcher"].append(asyncio.run(batcher_per_s(embedder, prompts)))
        print(f"round {round_ + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)

    print(f"\nmedians over {args.rounds} rounds, {len(prompts)} prompts from two_kinds.jsonl")
    print(f"{'embedder':<10} {'p50 ms':>8} {'p99 ms':>8} {'batch32/s':>10} {'batcher c32/s':>14}")
    for name, row in figures.items():
        p50, p99, batch, batcher = (statistics.median(row[k]) for k in ("p50", "p99", "batch", "batcher"))
        print(f"{name:<10} {p50:>8.1f} {p99:>8.1f} {batch:>10.0f} {batcher:>14.0f}")

    files = sorted(args.data.glob("*.jsonl" if args.quick else "*_routing.jsonl"))
    pool = [json.loads(line)["prompt"] for file in files for line in file.open() if line.strip()]
    random.Random(0).shuffle(pool)
    texts = pool[: args.memory + args.queries]
    ref = embedders["reference"].embed(texts)
    print(f"\nfidelity against the reference on {len(texts)} prompts from {args.data} "
          f"(recall@10: {args.queries} queries, {args.memory} memory prompts)")
    for name in ("fast", "fast-fp32", "static"):
        vectors = embedders[name].embed(texts)
        cosine = (vectors * ref).sum(axis=1) if name != "static" else None  # static vectors live in another space
        agreement = f"cosine mean {cosine.mean():.6f} min {cosine.min():.6f}" if cosine is not None else f"{vectors.shape[1]} dims"
        print(f"{name:<10} recall@10 {recall_at_10(vectors, ref, args.memory):.3f}  {agreement:<36} name {embedders[name].name}")


if __name__ == "__main__":
    main()
