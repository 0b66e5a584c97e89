"""Several replicas on one PostgreSQL: decisions/s and rewards/s with 1, 2 and 3 replicas on this machine,
and how long a write on one replica takes to be applied by the others (propagation lag p50/p99).

    .venv/bin/python bench/replicas.py                 # 600 decisions and 600 rewards per replica count
    .venv/bin/python bench/replicas.py --quick         # 120 of each: a smoke run
    .venv/bin/python bench/replicas.py --database-url postgresql://postgres@127.0.0.1:5432/test --replicas 1,2,3

For each replica count k: a fresh schema on the PostgreSQL (`--database-url`, default TEST_DATABASE_URL
or the local test database), k `llm-router serve` processes (`cluster.enabled`, default policies) in
front of one fake OpenAI-compatible backend (tests/fake_backend.py: `/v1/route` calls no backend, so
this measures the router and the database, not an LLM), then, from this process:

- decisions/s: N `POST /v1/route` spread round-robin over the replicas by the client, C at a time;
- rewards/s: one `POST /v1/rewards` per decision, each to the replica after the one that decided (every
  answer comes once the answering replica has applied the log up to that reward);
- propagation lag: each replica's `cluster.lag.propagation_ms` (another replica's write, from its row's
  write time to applied here, over the latest 2,000 such events): the worst replica's p50 and p99;
- drain: after the last answer, how long until every replica has applied the whole log.

A first row, `1 (one process)`, is the same load on one router without `cluster.enabled` (same
PostgreSQL): what following the shared log and holding the log lock cost a single replica.

The client runs on the same machine and takes CPU from the replicas and the database. Prints a table,
writes JSON (with the machine's description) to `--out` (default var/bench/replicas.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages
from bench.overhead import database, drive, free_port, load_prompts, router_env, tail  # noqa: E402
from tests.fake_backend import FakeVLLM  # noqa: E402

STARTUP_TIMEOUT_S = 180.0
DEFAULT_DATABASE = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def write_config(path: Path, database_url: str, backend_port: int, cluster: bool = True) -> None:
    path.write_text(f"""database_url = {json.dumps(database_url)}
seed = 7
[auth]
open_on_loopback = true
[cluster]
enabled = {str(cluster).lower()}
[[backends]]
name = "fake"
base_url = "http://127.0.0.1:{backend_port}"
model = "fake"
price_per_1m_input_tokens_usd = 0.1
price_per_1m_output_tokens_usd = 0.2
""")


def start(config: Path, name: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log = workdir / f"{name}.log"
    env = {**router_env(), "LLM_ROUTER_CLUSTER__REPLICA_ID": name, "LLM_ROUTER_LOG_LEVEL": "WARNING"}
    with log.open("ab") as handle:
        process = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--config", str(config), "--port", str(port)],
                                   cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    return process, f"http://127.0.0.1:{port}", log


def wait_up(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench: a replica exited with code {process.returncode}:\n{tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"bench: a replica was not up after {STARTUP_TIMEOUT_S:g}s:\n{tail(log)}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def measure(urls: list[str], requests: int, concurrency: int) -> dict[str, Any]:
    prompts = load_prompts()
    decisions: list[str | None] = [None] * requests
    async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
        async def decide(i: int) -> None:
            body = {"model": "auto", "messages": [{"role": "user", "content": f"{prompts[i % len(prompts)]} ({i})"}], "max_tokens": 16}
            response = await http.post(f"{urls[i % len(urls)]}/v1/route", json=body)
            response.raise_for_status()
            decisions[i] = response.json()["router"]["decision_id"]

        routed = await drive(requests, concurrency, 600, decide)

        async def reward(i: int) -> None:
            if decisions[i] is None:
                raise RuntimeError("no decision")
            response = await http.post(f"{urls[(i + 1) % len(urls)]}/v1/rewards", json={"decision_id": decisions[i], "reward": (i % 11) / 10})
            response.raise_for_status()

        rewarded = await drive(requests, concurrency, 600, reward)
        finished = time.perf_counter()
        while True:
            stats = [(await http.get(f"{url}/v1/policies/stats")).json()["cluster"] for url in urls]
            if None in stats:  # one process, no cluster: nothing to follow
                stats = [{"lag": {"propagation_ms": {"samples": 0}}}]
                break
            applied = {s["lag"]["applied_seq"] for s in stats}
            if len(applied) == 1 and applied == {stats[0]["lag"]["head_seq"]}:
                break
            if time.perf_counter() - finished > 60:
                break
            await asyncio.sleep(0.05)
        drain_s = time.perf_counter() - finished
    lags = [s["lag"]["propagation_ms"] for s in stats]
    measured = [lag for lag in lags if lag["samples"]]
    return {
        "replicas": len(urls),
        "decisions_per_s": routed.summary()["per_second"],
        "decision_p50_ms": routed.summary()["p50_ms"],
        "decision_p99_ms": routed.summary()["p99_ms"],
        "rewards_per_s": rewarded.summary()["per_second"],
        "reward_p50_ms": rewarded.summary()["p50_ms"],
        "reward_p99_ms": rewarded.summary()["p99_ms"],
        "failures": routed.failures + rewarded.failures,
        "errors": routed.errors + rewarded.errors,
        "lag_p50_ms": max((lag["p50"] for lag in measured), default=None),
        "lag_p99_ms": max((lag["p99"] for lag in measured), default=None),
        "lag_samples": sum(lag["samples"] for lag in measured),
        "drain_s": round(drain_s, 3),
    }


def run(count: int, database_url: str, requests: int, concurrency: int, workdir: Path, cluster: bool = True) -> dict[str, Any]:
    backend = FakeVLLM("fake")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with database(database_url, workdir) as url:
            config = workdir / f"router-{count}.toml"
            write_config(config, url, backend.port, cluster)
            started = [start(config, f"r{i + 1}", workdir) for i in range(count)]
            processes = [process for process, _, _ in started]
            for process, replica_url, log in started:
                wait_up(process, replica_url, log)
            result = asyncio.run(measure([u for _, u, _ in started], requests, concurrency))
            if not cluster:
                result["replicas"] = "1 (one process)"
            for process in processes:
                stop(process)
            return result
    finally:
        for process in processes:
            stop(process)
        backend.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="120 decisions and rewards per replica count, 8 at a time")
    parser.add_argument("--replicas", default="1,2,3", help="comma-separated replica counts")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE, help="PostgreSQL (a fresh schema per replica count)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the one-process row (no cluster.enabled)")
    parser.add_argument("--out", default=str(ROOT / "var" / "bench" / "replicas.json"))
    args = parser.parse_args(argv)
    requests, concurrency = (120, 8) if args.quick else (args.requests, args.concurrency)
    counts = [int(c) for c in args.replicas.split(",") if c.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as directory:
        if not args.no_baseline:
            results.append(run(1, args.database_url, requests, concurrency, Path(directory), cluster=False))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        for count in counts:
            results.append(run(count, args.database_url, requests, concurrency, Path(directory)))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    header = f"{'replicas':>16} {'decisions/s':>12} {'rewards/s':>10} {'lag p50 ms':>11} {'lag p99 ms':>11} {'drain s':>8} {'failures':>8}"
    print(header)
    for r in results:
        print(f"{r['replicas']!s:>16} {r['decisions_per_s']!s:>12} {r['rewards_per_s']!s:>10} {r['lag_p50_ms']!s:>11} {r['lag_p99_ms']!s:>11} "
              f"{r['drain_s']:>8} {r['failures']:>8}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "quick": args.quick, "requests": requests, "concurrency": concurrency, "results": results,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }, indent=2))
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
