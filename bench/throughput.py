"""Throughput of the two hot endpoints, driven by wrk: what the router takes when the load generator is not the limit.

Run from the repository root (about a minute; wrk from Debian's package `wrk`):

    .venv/bin/python bench/throughput.py                       # /v1/route and /v1/rewards
    .venv/bin/python bench/throughput.py --endpoint route --embedder static
    .venv/bin/python bench/throughput.py --database-url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/throughput.py --quick               # a smoke run (the Python client when wrk is absent)

bench/overhead.py drives the router from an httpx client in the same Python process that measures; on two
cores that client costs ~2 ms of CPU per request and takes a core the router would otherwise use. Here wrk
(C, two threads, concurrency 32) sends the requests.

It fills a fresh database with `--decisions` logged `/v1/route` decisions (bench/memory_scale.py's
writer: the memory the router searches, and the decisions the rewards name), starts `python -m router.cli
serve` on it (embedded defaults: six policies; two fake backends on loopback, never called), then:
- `route`: `POST /v1/route` for `--seconds`, every query new (one of bench/prompts.jsonl with a running
  number appended, so nothing is embedded twice); every answer must be a 200, and the decisions the
  router counts (`llm_router_decision_seconds_count`) at least the number acknowledged.
- `rewards`: `POST /v1/rewards` for `--seconds`, each a reward for the next filled decision, never one
  twice. Every answer must be a 200 acknowledging a new reward, and the backends' reward counts in
  `GET /v1/policies/stats` at least the number acknowledged (nothing acknowledged is lost) and at most
  that plus the 32 in flight when wrk stopped (whose answers it drops).
Prints per endpoint requests/s, latency p50/p99 (wrk's) and the router's CPU per request against the
issue's targets; writes them to `--out` (default var/bench/throughput.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages
from bench.memory_scale import fill, serve  # noqa: E402
from bench.overhead import CONCURRENCY, cpu_seconds, database, drive, free_port, load_prompts, server_decisions  # noqa: E402
from tests.fake_backend import FakeVLLM  # noqa: E402

ENDPOINTS = ("route", "rewards")
TARGETS = {"route": ("decisions/s", 400.0, 150.0), "rewards": ("rewards/s", 1500.0, None)}  # (unit, per second >=, p99 ms <=)

# Each wrk thread numbers its requests tid, tid + threads, ... so that no two requests share a number.
WRK_COUNTER = """
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
function init(args)
  nthreads, n = tonumber(args[1]), 0
end
local function next_number()
  local i = tid + n * nthreads + 1
  n = n + 1
  return i
end
"""
REWARDS_SCRIPT = WRK_COUNTER + """
function request()
  local i = next_number()
  local body = '{"decision_id": "dec_fill' .. i .. '", "reward": ' .. (i % 5) / 4 .. '}'
  return wrk.format("POST", "/v1/rewards", {["Content-Type"] = "application/json"}, body)
end
"""


def route_script(prompts: list[str]) -> str:
    """wrk's Lua for `/v1/route`: prompt i mod len(prompts), with " (#i)" appended inside its JSON string."""
    openings = ",\n".join(f"[==[{json.dumps(p)[:-1]}]==]" for p in prompts)  # JSON strings without their closing quote
    return WRK_COUNTER + f"""
local prompts = {{
{openings}
}}
function request()
  local i = next_number()
  local body = '{{"model": "auto", "messages": [{{"role": "user", "content": ' .. prompts[(i % #prompts) + 1] .. ' (#' .. i .. ')"}}]}}'
  return wrk.format("POST", "/v1/route", {{["Content-Type"] = "application/json"}}, body)
end
"""


def parse_wrk(output: str) -> dict[str, Any]:
    def latency_ms(label: str) -> float | None:
        found = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        if not found:
            return None
        return float(found.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]

    sent = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    return {"requests": int(sent.group(1)) if sent else 0, "non_2xx": int(bad.group(1)) if bad else 0,
            "per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
            "p50_ms": latency_ms("50"), "p99_ms": latency_ms("99"), "socket_errors": errors.group(1) if errors else None}


def with_wrk(router: str, seconds: float, script_text: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(script_text)
        script.flush()
        done = subprocess.run(["wrk", "-t2", f"-c{CONCURRENCY}", f"-d{seconds:g}s", "--latency", "-s", script.name, router, "--", "2"],
                              capture_output=True, text=True, check=True)
    return {"client": "wrk", **parse_wrk(done.stdout)}


def with_python(count: int, post: Callable[[httpx.AsyncClient, int], Any]) -> dict[str, Any]:
    """The fallback without wrk: `count` requests `post(client, i)` (i from 1) at concurrency 32 from httpx."""
    async def run() -> Any:
        async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
            async def one(i: int) -> None:
                response = await post(client, i + 1)
                if response.status_code != 200 or response.json().get("duplicate"):
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

            return await drive(count, CONCURRENCY, 120, one)

    summary = asyncio.run(run()).summary()
    return {"client": "python", "requests": summary["ok"] + summary["failures"], "non_2xx": summary["failures"],
            "per_second": summary["per_second"], "p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"], "socket_errors": None}


def load_route(router: str, args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    for prompt in prompts[:CONCURRENCY]:  # warm-up (the first batches of the embedder are slow), not measured
        httpx.post(f"{router}/v1/route", json={"model": "auto", "messages": [{"role": "user", "content": f"{prompt} (warm-up)"}]},
                   timeout=60, trust_env=False).raise_for_status()
    before = server_decisions(httpx.get(f"{router}/metrics", timeout=60, trust_env=False).text)[1]
    if shutil.which("wrk") and not args.python_client:
        load = with_wrk(router, args.seconds, route_script(prompts))
    else:
        load = with_python(200, lambda client, i: client.post(f"{router}/v1/route", json={
            "model": "auto", "messages": [{"role": "user", "content": f"{prompts[i % len(prompts)]} (#{i})"}]}))
    after = server_decisions(httpx.get(f"{router}/metrics", timeout=60, trust_env=False).text)[1]
    acknowledged = load["requests"] - load["non_2xx"]
    load["counted"] = int(after - before)
    load["consistent"] = acknowledged <= load["counted"] <= acknowledged + CONCURRENCY
    return load


def load_rewards(router: str, args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") and not args.python_client:
        load = with_wrk(router, args.seconds, REWARDS_SCRIPT)
    else:
        load = with_python(min(args.decisions, 400), lambda client, i: client.post(
            f"{router}/v1/rewards", json={"decision_id": f"dec_fill{i}", "reward": 0.5}))
    stats = httpx.get(f"{router}/v1/policies/stats", timeout=120, trust_env=False).json()
    acknowledged = load["requests"] - load["non_2xx"]
    load["counted"] = sum(int(b.get("rewards") or 0) for b in stats["backends"].values())
    load["consistent"] = acknowledged <= load["counted"] <= acknowledged + CONCURRENCY and acknowledged < args.decisions
    return load


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from router.config import EmbedderConfig
    from router.embedding import build_embedder

    embedder = build_embedder(EmbedderConfig(kind=args.embedder))
    prompts = load_prompts()
    results: dict[str, Any] = {"decisions": args.decisions, "embedder": embedder.name, "endpoints": {}}
    with database(args.database_url, workdir) as url:
        results["fill_s"] = round(fill(url, embedder.name, embedder.embed(prompts), args.decisions, rewarded_every=0), 1)
        backends = [FakeVLLM("small"), FakeVLLM("large")]
        config = workdir / "router.toml"
        tables = "".join(
            f'\n[[backends]]\nname = "{b.model}"\nbase_url = "http://127.0.0.1:{b.port}"\nmodel = "{b.model}"\n'
            f"price_per_1m_input_tokens_usd = {price}\nprice_per_1m_output_tokens_usd = {price * 2}\n"
            for price, b in zip((0.1, 1.0), backends)
        )
        config.write_text(f'database_url = {json.dumps(url)}\nseed = 7\n[auth]\nopen_on_loopback = true\n'
                          f'[embedder]\nkind = "{args.embedder}"\n{tables}')

        def load(router: str, pid: int) -> None:
            for endpoint in args.endpoints:
                before = cpu_seconds(pid)
                found = load_route(router, args, prompts) if endpoint == "route" else load_rewards(router, args)
                if before is not None:
                    found["router_cpu_ms_per_request"] = round((cpu_seconds(pid) - before) * 1000 / max(found["requests"], 1), 3)
                results["endpoints"][endpoint] = found

        results["start_s"], results["rss_mb"] = serve(config, free_port(), workdir / "router.log", load)
        for backend in backends:
            backend.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10,000 decisions, 2 s per endpoint")
    parser.add_argument("--endpoint", choices=(*ENDPOINTS, "both"), default="both")
    parser.add_argument("--embedder", choices=("transformer", "static"), default="transformer", help="[embedder] kind")
    parser.add_argument("--decisions", type=int, default=40_000, help="decisions filled (and rewardable; more than a run can use)")
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk's duration per endpoint")
    parser.add_argument("--python-client", action="store_true", help="send with httpx, as bench/overhead.py does")
    parser.add_argument("--database-url", help="PostgreSQL URL (a fresh schema is made and dropped); default: temp SQLite")
    parser.add_argument("--out", default="var/bench/throughput.json")
    args = parser.parse_args(argv)
    args.endpoints = ENDPOINTS if args.endpoint == "both" else (args.endpoint,)
    if args.quick:
        args.decisions, args.seconds = 10_000, 2.0  # more than 2 s of rewards can name, at 1,500/s and well beyond
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        results = run(args, Path(tmp))
    ok = True
    print(f"{'':44s} {'measured':>20s} {'target':>10s}")
    for endpoint, load in results["endpoints"].items():
        unit, rate, p99 = TARGETS[endpoint]
        rows = [
            (f"{endpoint}: client", load["client"], ""),
            (f"{endpoint}: {unit}, c={CONCURRENCY}", load["per_second"], f">= {rate:g}"),
            (f"{endpoint}: p50 / p99 ms", f"{load['p50_ms']} / {load['p99_ms']}", f"p99 <= {p99:g}" if p99 else ""),
            (f"{endpoint}: router CPU ms per request", load.get("router_cpu_ms_per_request"), ""),
            (f"{endpoint}: not 200 (must be 0)", load["non_2xx"], "0"),
            (f"{endpoint}: counted by the router / acknowledged", f"{load['counted']} / {load['requests'] - load['non_2xx']}", ">=, <= +32"),
        ]
        for name, value, target in rows:
            print(f"{name:44s} {value!s:>20s} {target:>10s}")
        ok = ok and load["consistent"] and load["non_2xx"] == 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"bench: wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
