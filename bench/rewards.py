"""Durable reward ingestion, driven by wrk: what the router takes when the load generator is not the limit.

Run from the repository root (a minute; wrk from Debian's package `wrk`):

    .venv/bin/python bench/rewards.py
    .venv/bin/python bench/rewards.py --database-url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/rewards.py --quick               # a smoke run (the Python client when wrk is absent)

bench/overhead.py posts rewards from an httpx client in the same Python process that measures; on two
cores that client, at ~2 ms of CPU per POST, caps the rate near 400/s while the router sits mostly idle
(py-spy: the event loop waits in epoll two thirds of the time). Here wrk (C, two threads) posts them.

It fills a fresh database with `--decisions` logged `/v1/route` decisions (bench/memory_scale.py's
writer), starts `python -m router.cli serve` on it (embedded defaults: six policies learn from every
reward; two fake backends on loopback, never called), then runs wrk for `--seconds` at concurrency 32,
each request a reward for the next decision, never one twice. Every answer must be a 200 acknowledging a
new reward, and the backends' reward counts in `GET /v1/policies/stats` must be at least the number
acknowledged (nothing acknowledged is lost) and at most that plus the 32 in flight when wrk stopped (whose
answers it drops). Prints rewards/s, latency p50/p99 (wrk's), and the router's
CPU per reward; writes them to `--out` (default var/bench/rewards.json).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages
from bench.memory_scale import fill, serve  # noqa: E402
from bench.overhead import CONCURRENCY, cpu_seconds, database, drive, free_port, load_prompts  # noqa: E402
from tests.fake_backend import FakeVLLM  # noqa: E402

TARGET_PER_S = 1500.0
WRK_SCRIPT = """
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
function init(args)
  nthreads, n = tonumber(args[1]), 0
end
function request()
  local i = tid + n * nthreads + 1
  n = n + 1
  local body = '{"decision_id": "dec_fill' .. i .. '", "reward": ' .. (i % 5) / 4 .. '}'
  return wrk.format("POST", "/v1/rewards", {["Content-Type"] = "application/json"}, body)
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


def with_wrk(router: str, seconds: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT)
        script.flush()
        done = subprocess.run(["wrk", "-t2", f"-c{CONCURRENCY}", f"-d{seconds:g}s", "--latency", "-s", script.name, router, "--", "2"],
                              capture_output=True, text=True, check=True)
    return {"client": "wrk", **parse_wrk(done.stdout)}


def with_python(router: str, count: int) -> dict[str, Any]:
    import asyncio

    async def run() -> Any:
        async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
            async def one(i: int) -> None:
                response = await client.post(f"{router}/v1/rewards", json={"decision_id": f"dec_fill{i + 1}", "reward": 0.5})
                if response.status_code != 200 or response.json().get("duplicate"):
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

            return await drive(count, CONCURRENCY, 120, one)

    load = asyncio.run(run())
    summary = load.summary()
    return {"client": "python", "requests": summary["ok"] + summary["failures"], "non_2xx": summary["failures"],
            "per_second": summary["per_second"], "p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"], "socket_errors": None}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from router.embedding import Embedder

    embedder = Embedder()
    results: dict[str, Any] = {"decisions": args.decisions}
    with database(args.database_url, workdir) as url:
        results["fill_s"] = round(fill(url, embedder.name, embedder.embed(load_prompts()), args.decisions, rewarded_every=0), 1)
        backends = [FakeVLLM("small"), FakeVLLM("large")]
        config = workdir / "router.toml"
        tables = "".join(
            f'\n[[backends]]\nname = "{b.model}"\nbase_url = "http://127.0.0.1:{b.port}"\nmodel = "{b.model}"\n'
            f"price_per_1m_input_tokens_usd = {price}\nprice_per_1m_output_tokens_usd = {price * 2}\n"
            for price, b in zip((0.1, 1.0), backends)
        )
        config.write_text(f'database_url = {json.dumps(url)}\nseed = 7\n[auth]\nopen_on_loopback = true\n{tables}')

        def load(router: str, pid: int) -> None:
            before = cpu_seconds(pid)
            use_wrk = shutil.which("wrk") is not None and not args.python_client
            results["load"] = with_wrk(router, args.seconds) if use_wrk else with_python(router, min(args.decisions, 400))
            if before is not None:
                results["load"]["router_cpu_ms_per_reward"] = round((cpu_seconds(pid) - before) * 1000 / max(results["load"]["requests"], 1), 3)
            stats = httpx.get(f"{router}/v1/policies/stats", timeout=120, trust_env=False).json()
            results["rewards_in_stats"] = sum(int(b.get("rewards") or 0) for b in stats["backends"].values())

        results["start_s"], results["rss_mb"] = serve(config, free_port(), workdir / "router.log", load)
        for backend in backends:
            backend.close()
    load_results = results["load"]
    results["acknowledged"] = load_results["requests"] - load_results["non_2xx"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2,000 decisions, 3 s")
    parser.add_argument("--decisions", type=int, default=40_000, help="decisions to reward (more than the run can use)")
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk's duration")
    parser.add_argument("--python-client", action="store_true", help="post with httpx, as bench/overhead.py does")
    parser.add_argument("--database-url", help="PostgreSQL URL (a fresh schema is made and dropped); default: temp SQLite")
    parser.add_argument("--out", default="var/bench/rewards.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.decisions, args.seconds = 2_000, 1.0
    with tempfile.TemporaryDirectory(prefix="rewards-") as tmp:
        results = run(args, Path(tmp))
    load = results["load"]
    rows = [
        ("client", load["client"], ""),
        ("rewards/s, c=32", load["per_second"], f">= {TARGET_PER_S:g}"),
        ("p50 / p99 ms", f"{load['p50_ms']} / {load['p99_ms']}", ""),
        ("router CPU ms per reward", load.get("router_cpu_ms_per_reward"), ""),
        ("not 200 (must be 0)", load["non_2xx"], "0"),
        ("rewards in stats / acknowledged", f"{results['rewards_in_stats']} / {results['acknowledged']}", ">=, <= +32"),
    ]
    for name, value, target in rows:
        print(f"{name:40s} {value!s:>20s} {target:>8s}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"bench: wrote {out}")
    consistent = results["acknowledged"] <= results["rewards_in_stats"] <= results["acknowledged"] + CONCURRENCY
    return 0 if consistent and load["non_2xx"] == 0 and results["acknowledged"] < results["decisions"] else 1


if __name__ == "__main__":
    sys.exit(main())
