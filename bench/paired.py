"""Paired A/B of `/v1/route` (or a routed chat) at concurrency 1: two checkouts' routers side by side, the same requests in turn.

Run from the repository root of the change (a few minutes; `/v1/route` never calls the backends, a chat does):

    git worktree add /tmp/base main && ln -s "$PWD/.venv" /tmp/base/.venv
    .venv/bin/python bench/paired.py --base /tmp/base --backends-from http://127.0.0.1:8001,http://127.0.0.1:8002
    .venv/bin/python bench/paired.py --base /tmp/base --backends-from ... --idle       # 0.25 s between requests
    .venv/bin/python bench/paired.py --base /tmp/base --backends-from ... --endpoint chat --idle  # routed chats, max_tokens=1
    .venv/bin/python bench/paired.py --base /tmp/base --backends-from ... --quick      # a smoke run

Why: on a shared 2-core machine, back-to-back runs of bench/overhead.py drift by more than the 0.2-0.5 ms a
change to the request path is worth (route p50 at c=1 moved 6.2-8.4 ms between identical runs). Here both
routers run at once, each from its own checkout (`--base`, and `--change`, default this one) with its own
fresh SQLite database and the same config (embedded defaults, `--embedder`), and they take alternating
blocks of sequential requests (the order flips every block), so drift and noise fall on both alike. Run
it twice with the checkouts swapped: the second router started runs a little faster here (~0.5 ms; the
same checkout on both sides shows it), so a change is real when it wins in both orders.

Prints per side: p50 / p90 / p99 of client-side latency and the router's CPU per request (from /proc,
every thread); writes them to `--out` (default var/bench/paired.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.overhead import (  # noqa: E402 - run as a script: the repository's packages first
    cpu_seconds,
    free_port,
    load_prompts,
    percentile,
    remote_backends,
    route_body,
    router_env,
    stop_router,
    wait_healthy,
    write_config,
)

IDLE_PAUSE_S = 0.25  # as bench/overhead.py's idle row: the router waits while a backend generates
PATHS = {"route": "/v1/route", "chat": "/v1/chat/completions"}


def start(checkout: Path, workdir: Path, backends: list[Any], embedder: str | None) -> tuple[subprocess.Popen[bytes], str, Path]:
    """One router from `checkout` (its own venv) on a fresh SQLite database in `workdir`."""
    workdir.mkdir(parents=True)
    config = workdir / "router.toml"
    write_config(config, f"sqlite:///{workdir / 'router.db'}", backends, False, None, embedder)
    port = free_port()
    log = workdir / "router.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(checkout / ".venv" / "bin" / "python"), "-m", "router.cli", "serve", "--config", str(config), "--port", str(port)],
            cwd=checkout, env=router_env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    return process, f"http://127.0.0.1:{port}", log


def measure(client: httpx.Client, sides: dict[str, tuple[subprocess.Popen[bytes], str]], prompts: list[str], blocks: int, per_block: int,
            warmup: int, pause_s: float, endpoint: str) -> dict[str, dict[str, Any]]:
    """`endpoint` "route": `/v1/route`; "chat": a routed chat completion (`model: auto`) with max_tokens=1."""
    latencies: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    sent = 0

    def post(url: str) -> float:
        nonlocal sent
        sent += 1
        started = time.perf_counter()
        body = route_body(f"{prompts[sent % len(prompts)]} (#{sent})")  # every query new
        if endpoint == "chat":
            body["max_tokens"] = 1
        response = client.post(f"{url}{PATHS[endpoint]}", json=body)
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise SystemExit(f"bench: {PATHS[endpoint]} answered {response.status_code}: {response.text[:300]}")
        return elapsed

    for _, url in sides.values():
        for _ in range(warmup):
            post(url)
    names = list(sides)
    for block in range(blocks):
        for name in names if block % 2 == 0 else names[::-1]:
            process, url = sides[name]
            before = cpu_seconds(process.pid)
            for _ in range(per_block):
                latencies[name].append(post(url))
                if pause_s:
                    time.sleep(pause_s)
            after = cpu_seconds(process.pid)
            if before is not None and after is not None:
                cpu[name].append((after - before) * 1000 / per_block)
    return {
        name: {
            "requests": len(values),
            "p50_ms": round(percentile(values, 50) or 0.0, 3),
            "p90_ms": round(percentile(values, 90) or 0.0, 3),
            "p99_ms": round(percentile(values, 99) or 0.0, 3),
            "router_cpu_ms_per_request": round(statistics.mean(cpu[name]), 3) if cpu[name] else None,
        }
        for name, values in latencies.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="checkout to compare against (with its own .venv, e.g. a symlink)")
    parser.add_argument("--change", default=str(ROOT), help="checkout with the change (default: this one)")
    parser.add_argument("--backends-from", required=True, help="comma-separated base URLs of running OpenAI-compatible servers")
    parser.add_argument("--embedder", choices=("transformer", "static"), default="static", help="[embedder] kind (default: %(default)s)")
    parser.add_argument("--endpoint", choices=tuple(PATHS), default="route", help="what each request is (default: %(default)s)")
    parser.add_argument("--blocks", type=int, default=20, help="blocks per side (default: %(default)s)")
    parser.add_argument("--idle", action="store_true", help=f"{IDLE_PAUSE_S} s between requests (as around a chat call)")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--out", default="var/bench/paired.json", help="JSON report (default: %(default)s)")
    args = parser.parse_args(argv)
    blocks, per_block, warmup = (2, 5, 3) if args.quick else (args.blocks, 10 if args.idle else 40, 30)
    backends = remote_backends(args.backends_from)
    workdir = Path(tempfile.mkdtemp(prefix="llm-router-paired-"))
    started: dict[str, tuple[subprocess.Popen[bytes], str, Path]] = {}
    failed = True
    try:
        for name, checkout in (("base", args.base), ("change", args.change)):
            started[name] = start(Path(checkout).resolve(), workdir / name, backends, args.embedder)
        for process, url, log in started.values():
            wait_healthy(process, url, len(backends), log)
        with httpx.Client(timeout=30.0, trust_env=False) as client:
            results = measure(client, {name: (p, url) for name, (p, url, _) in started.items()}, load_prompts(), blocks, per_block,
                              warmup, IDLE_PAUSE_S if args.idle else 0.0, args.endpoint)
        failed = False
    finally:
        for process, _, _ in started.values():
            stop_router(process, [])
        if failed:
            print(f"bench: the routers' logs are kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'side':<8}{'checkout':<40}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'CPU ms':>9}")
    for name, checkout in (("base", args.base), ("change", args.change)):
        r = results[name]
        print(f"{name:<8}{checkout[-39:]:<40}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['router_cpu_ms_per_request'] or 0:>9.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"quick": args.quick, "endpoint": args.endpoint, "idle": args.idle, "embedder": args.embedder, "base": args.base, "change": args.change,
              "blocks": blocks, "per_block": per_block, "results": results}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"bench: wrote {out}" + (" (quick run: indicative only)" if args.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
