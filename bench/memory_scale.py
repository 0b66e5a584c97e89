"""Memory at scale: a router whose log holds a million decisions. Start-up time, RSS, route latency, recall.

Run from the repository root (about 10 minutes at a million on the 2-core target; most of it filling the
database):

    .venv/bin/python bench/memory_scale.py                      # 1,000,000 decisions, SQLite
    .venv/bin/python bench/memory_scale.py --quick              # 30,000: a smoke run (past the exact-search bound)
    .venv/bin/python bench/memory_scale.py --database-url postgresql://postgres@127.0.0.1:5432/test

It fills a fresh database (a SQLite file in a temp dir, or a fresh PostgreSQL schema dropped afterwards)
with `--decisions` logged decisions, a third of them rewarded, written straight into the tables as the
router writes them. Their embeddings are the packaged embedder's vectors of the prompts in
tests/data/two_kinds.jsonl, each moved by Gaussian noise (cosine about 0.85 to its prompt), so the
memory has the clustered shape of real traffic. Then it starts `python -m router.cli serve` on it with
two fake OpenAI-compatible backends on loopback (routing calls no backend), and measures:

- start-up: process start to `/health` ok (the memory is rebuilt from the database before serving);
- the router's RSS once it serves;
- `/v1/route` p50/p99 at concurrency 1 (after a warm-up), fresh prompts each time;
- neighbour recall@k of the memory's index against exact search over the same vectors (in this process,
  with the router's `[memory]` settings: the index the router builds at this size).

Prints a table against the targets (start <= 60 s, RSS <= 2 GB, route p99 <= 20 ms) and writes every
figure to `--out` (default var/bench/memory_scale.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages
from bench.overhead import database, drive, free_port, load_prompts, percentile, router_env, tail  # noqa: E402
from tests.fake_backend import FakeVLLM  # noqa: E402

TARGETS = {"start_s": 60.0, "rss_mb": 2048.0, "route_p99_ms": 20.0}
FILL_CHUNK = 20_000


def clustered_vectors(base: np.ndarray, count: int, seed: int = 0, spread: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """`count` unit vectors around the rows of `base` (which row each came from, and the vectors)."""
    rng = np.random.default_rng(seed)
    origin = rng.integers(0, len(base), size=count)
    noise = rng.normal(size=(count, base.shape[1])).astype(np.float32) * (spread / np.sqrt(base.shape[1]))
    vectors = base[origin] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return origin, vectors.astype(np.float32)


def fill(database_url: str, embedder_name: str, base: np.ndarray, count: int, rewarded_every: int = 3) -> float:
    """Write `count` decisions `dec_fill1` ... (one in `rewarded_every` rewarded; 0: none) as the router logs
    them; returns seconds taken."""
    from sqlalchemy import insert

    from router.db import create_db_engine, migrate
    from router.tables import DecisionRow, QueryEmbedding, Reward

    engine = create_db_engine(database_url)
    migrate(engine)
    started = time.perf_counter()
    epoch = datetime.now(UTC) - timedelta(days=30)
    backends = ("small", "large")
    for start in range(0, count, FILL_CHUNK):
        size = min(FILL_CHUNK, count - start)
        origin, vectors = clustered_vectors(base, size, seed=start)
        ids = [start + i + 1 for i in range(size)]
        with engine.begin() as connection:
            connection.execute(insert(QueryEmbedding.__table__), [
                {"id": i, "embedder": embedder_name, "dim": base.shape[1], "vector": v.tobytes()} for i, v in zip(ids, vectors)
            ])
            connection.execute(insert(DecisionRow.__table__), [
                {"id": f"dec_fill{i}", "created_at": epoch + timedelta(seconds=i), "kind": "route", "tenant": None,
                 "requested_model": "auto", "query": f"prompt {o}", "prompt_tokens_estimate": 40, "embedding_id": i,
                 "policy": "thompson", "backend": backends[i % 2], "chosen_backend": backends[i % 2], "propensity": 0.5,
                 "scores": {}, "candidates": [], "neighbours": [], "shadow": {}, "cost_weight": 0.0, "cost_scale": 1.0,
                 "predicted_cost_usd": 1e-5, "over_budget": False, "decision_ms": 1.0, "status": "routed", "failed_backends": [],
                 "mode": "route"}
                for i, o in zip(ids, origin.tolist())
            ])
            rewards = [
                {"decision_id": f"dec_fill{i}", "reward": float(o % 2), "created_at": epoch + timedelta(seconds=i)}
                for i, o in zip(ids, origin.tolist()) if rewarded_every and i % rewarded_every == 0
            ]
            if rewards:
                connection.execute(insert(Reward.__table__), rewards)
        print(f"bench: filled {start + size:,} / {count:,} decisions", file=sys.stderr, flush=True)
    engine.dispose()
    return time.perf_counter() - started


def recall(base: np.ndarray, count: int, k: int, queries: int = 200) -> dict[str, Any]:
    """Neighbour recall@k of the memory's index at this size against exact inner-product search."""
    from router.config import MemoryConfig
    from router.memory import Memory, MemoryEntry

    settings = MemoryConfig()
    memory = Memory(base.shape[1], settings)

    def batches():
        for start in range(0, count, FILL_CHUNK):
            size = min(FILL_CHUNK, count - start)
            _, vectors = clustered_vectors(base, size, seed=start)
            ids = np.arange(start + 1, start + size + 1, dtype=np.int64)
            yield ids, vectors, [MemoryEntry(f"dec_fill{i}", "small") for i in ids.tolist()]

    memory.load(count, batches())
    all_vectors = np.concatenate([v for _, v, _ in batches()])
    _, probes = clustered_vectors(base, queries, seed=10**9)
    hits = 0
    for probe in probes:
        exact = set((np.argsort(-(all_vectors @ probe))[:k] + 1).tolist())
        found = {int(n.decision_id.removeprefix("dec_fill")) for n in memory.search(probe, k)}
        hits += len(exact & found)
    return {"k": k, "index": memory.index_kind, "nprobe": settings.nprobe, "recall": round(hits / (k * queries), 4)}


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def route_latencies(url: str, prompts: list[str], total: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        async def one(i: int) -> None:
            body = {"model": "auto", "messages": [{"role": "user", "content": f"{prompts[i % len(prompts)]} ({i})"}]}
            response = await client.post(f"{url}/v1/route", json=body)
            response.raise_for_status()

        await drive(20, 1, 60, one)  # warm-up
        load = await drive(total, 1, 300, lambda i: one(i + 20))
    return {"p50_ms": percentile(load.latencies_ms, 50), "p99_ms": percentile(load.latencies_ms, 99),
            "ok": len(load.latencies_ms), "failures": load.failures, "errors": load.errors}


def serve(config: Path, port: int, log: Path, while_up: Any) -> tuple[float, float | None]:
    """Start the router on `config`, call `while_up(url, pid)` once it serves, then stop it (SIGTERM: it writes
    a snapshot as it stops). Returns its start-up seconds (process start to /health ok) and its RSS in MB
    after `while_up`."""
    started = time.perf_counter()
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--config", str(config), "--port", str(port)],
                                   cwd=ROOT, env=router_env(), stdout=out, stderr=subprocess.STDOUT)
    router = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"bench: the router exited with code {process.returncode}:\n{tail(log)}")
            try:
                if httpx.get(f"{router}/health", timeout=2, trust_env=False).json().get("status") == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.perf_counter() - started > 1800:
                raise SystemExit(f"bench: the router did not start in 1800 s:\n{tail(log)}")
            time.sleep(0.2)
        elapsed = round(time.perf_counter() - started, 2)
        print(f"bench: router serving after {elapsed} s", file=sys.stderr, flush=True)
        while_up(router, process.pid)
        rss = rss_mb(process.pid)
    finally:
        process.terminate()
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
    return elapsed, rss


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from router.embedding import Embedder

    embedder = Embedder()
    prompts = load_prompts()
    base = embedder.embed(prompts)
    results: dict[str, Any] = {"decisions": args.decisions, "embedder": embedder.name}
    with database(args.database_url, workdir) as url:
        results["fill_s"] = round(fill(url, embedder.name, base, args.decisions), 1)
        backends = [FakeVLLM(f"model-{name}") for name in ("small", "large")]
        port = free_port()
        config = workdir / "router.toml"
        tables = "\n".join(
            f'[[backends]]\nname = "{name}"\nbase_url = "http://127.0.0.1:{b.port}"\nmodel = "{b.model}"\n'
            f"price_per_1m_input_tokens_usd = {price}\nprice_per_1m_output_tokens_usd = {price * 2}\n"
            for (name, price), b in zip((("small", 0.1), ("large", 1.0)), backends)
        )
        config.write_text(f'database_url = {json.dumps(url)}\nseed = 7\n[auth]\nopen_on_loopback = true\n\n{tables}')
        log = workdir / "router.log"
        # The first start has no snapshot: it learns every logged reward, then writes one when stopped.
        # The second start (a router restarting, as usual) restores it and rebuilds the memory: measured.
        results["first_start_s"], _ = serve(config, port, log, lambda router, pid: None)
        results["start_s"], results["rss_mb"] = serve(
            config, port, log, lambda router, pid: results.update(route=asyncio.run(route_latencies(router, prompts, args.requests)))
        )
        results["router_log_memory"] = [line for line in tail(log, 4000).splitlines() if "memory:" in line][-1:]
        for backend in backends:
            backend.close()
    results["recall"] = recall(base, args.decisions, k=10)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30,000 decisions: a smoke run")
    parser.add_argument("--decisions", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=300, help="routed requests measured (concurrency 1)")
    parser.add_argument("--database-url", help="PostgreSQL URL (a fresh schema is made and dropped); default: temp SQLite")
    parser.add_argument("--out", default="var/bench/memory_scale.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.decisions, args.requests = 30_000, 60
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="memory-scale-") as tmp:
        results = run(args, Path(tmp))
    route = results["route"]
    rows = [
        ("decisions in the log", f"{results['decisions']:,}", ""),
        ("fill s (not a target)", results["fill_s"], ""),
        ("first start s (no snapshot: learns every logged reward)", results["first_start_s"], ""),
        ("start-up s (restart: snapshot + memory rebuilt)", results["start_s"], f"<= {TARGETS['start_s']:g}"),
        ("RSS MB (after the route load)", round(results["rss_mb"] or 0, 1), f"<= {TARGETS['rss_mb']:g}"),
        ("route p50 ms, c=1", round(route["p50_ms"], 2), ""),
        ("route p99 ms, c=1", round(route["p99_ms"], 2), f"<= {TARGETS['route_p99_ms']:g}"),
        ("route failures", route["failures"], "0"),
        (f"recall@{results['recall']['k']} ({results['recall']['index']}, nprobe {results['recall']['nprobe']})",
         results["recall"]["recall"], ""),
    ]
    for name, value, target in rows:
        print(f"{name:58s} {value!s:>12s} {target:>8s}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, "run_id": uuid.uuid4().hex[:8]}, indent=2, default=str))
    print(f"bench: wrote {out}")
    return 0 if route["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
