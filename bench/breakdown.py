"""Where a routing decision's and a reward's time goes, in-process (no HTTP, no load client). Not `profile.py`:
that name would shadow the standard library's module for every script in bench/.

Run from the repository root (a minute; both embedders when the static one is distilled):

    .venv/bin/python bench/breakdown.py
    .venv/bin/python bench/breakdown.py --quick               # small counts: a smoke run
    .venv/bin/python bench/breakdown.py --embedder static

It builds the service on its embedded defaults (policies, budget) over a temporary SQLite database; the
backends are never called (`/v1/route` decisions and rewards only). Then it times, as medians of
per-call wall time (CPU time for the loops), the parts of one decision at concurrency 1:

- `embed`: the configured embedder on one prompt (tests/data/two_kinds.jsonl, GSM8K and MBPP);
- `memory search`: the k nearest past decisions in the FAISS memory;
- `active policy` and each shadow policy's `score` on the same context;
- `engine.decide`: all of the above but the embedding, plus costs, candidates and the decision record;

then whole loops through `RouterService`: `route` decisions at concurrency 1 and 32 (embedding, deciding,
the logged write with group commit) and `feedback` (rewards) at concurrency 32, as wall time and process
CPU time per call (every thread: ONNX Runtime's and the database writer's included). HTTP adds what
bench/overhead.py shows as the `/health` floor and the handler.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from bench.overhead import load_prompts  # noqa: E402


def median_ms(call: Any, rounds: int) -> float:
    times = []
    for i in range(rounds):
        started = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def loop(calls: int, concurrency: int, work: Any) -> tuple[float, float]:
    """(wall ms, process CPU ms) per call of `work(i)`, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await work(i)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(calls)))
    return (time.perf_counter() - wall) / calls * 1000, (time.process_time() - cpu) / calls * 1000


async def profile(args: argparse.Namespace, workdir: Path) -> list[tuple[str, float, float | None]]:
    from policies import Arm, Context
    from router.config import load_config
    from router.service import RouterService, RoutingRequest

    environ = {"LLM_ROUTER_DATABASE_URL": f"sqlite:///{workdir / 'router.db'}"}
    if args.embedder:
        environ["LLM_ROUTER_EMBEDDER__KIND"] = args.embedder
    service = RouterService(load_config(None, environ=environ))
    prompts = load_prompts()
    rows: list[tuple[str, float, float | None]] = []

    def request(i: int) -> RoutingRequest:
        text = f"{prompts[i % len(prompts)]} ({i})"  # every query new: no cache of any kind helps
        return RoutingRequest(query=text, prompt=text, model="auto", output_limit=256, body={})

    for i in range(args.memory):  # a memory to search, and learned policies
        routed = await service.route(request(i))
        if i % 2 == 0:
            await service.feedback(routed.decision_id, None, reward=(i % 7) / 6)

    engine = service.engine
    vectors = service.embedder.embed([f"{p} (probe)" for p in prompts])
    rows.append(("embed one prompt", median_ms(lambda i: service.embedder.embed([prompts[i % len(prompts)]]), args.rounds), None))
    rows.append(("memory search (k nearest)", median_ms(lambda i: engine.memory.search(vectors[i % len(vectors)], engine.neighbours), args.rounds), None))
    neighbours = engine.memory.search(vectors[0], engine.neighbours)
    arms = tuple(Arm(s.spec.name, s.spec.price_per_1m_input_tokens_usd, s.spec.price_per_1m_output_tokens_usd, 1e-5)
                 for s in (service.pool.state(n) for n in service.pool.names()))
    context = Context(embedding=vectors[0], prompt_tokens=40, arms=arms, neighbours=neighbours, cost_weight=0.0, cost_scale=1e-5)
    for name, policy in engine.policies.items():
        label = f"{name}.choose (active)" if name == engine.active else f"{name}.score (shadow)"
        call = policy.choose if name == engine.active else policy.score
        rows.append((label, median_ms(lambda i, call=call: call(context), args.rounds), None))
    candidates = list(arms)

    def decide(i: int) -> None:
        engine.decide(f"probe{i}", 10**12 + i, vectors[i % len(vectors)], 40, candidates)
        engine.forget(f"probe{i}")

    rows.append(("engine.decide (all but the embedding)", median_ms(decide, args.rounds), None))

    async def route(i: int) -> None:
        await service.route(request(10**6 + i))

    for concurrency in (1, 32):
        wall, cpu = await loop(args.calls, concurrency, route)
        rows.append((f"service.route, c={concurrency} (embed + decide + logged write)", wall, cpu))
    decisions = [(await service.route(request(2 * 10**6 + i))).decision_id for i in range(args.calls)]

    async def reward(i: int) -> None:
        await service.feedback(decisions[i], None, reward=(i % 5) / 4)

    wall, cpu = await loop(args.calls, 32, reward)
    rows.append(("service.feedback, c=32 (durable reward + every policy learns)", wall, cpu))
    await service.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--embedder", choices=("transformer", "static"), help="[embedder] kind (default: the config default)")
    parser.add_argument("--rounds", type=int, default=300, help="calls per median")
    parser.add_argument("--calls", type=int, default=1000, help="calls per service loop")
    parser.add_argument("--memory", type=int, default=2000, help="decisions made first (half rewarded)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.memory = 20, 64, 100
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        rows = asyncio.run(profile(args, Path(tmp)))
    print(f"{'part':66s} {'wall ms':>9s} {'CPU ms':>8s}")
    for name, wall, cpu in rows:
        print(f"{name:66s} {wall:9.3f} {'' if cpu is None else f'{cpu:8.3f}':>8s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
