"""Bounded load on a running router, from loopback: one kind of request, N of them, C at a time.

    .venv/bin/python bench/load.py --url http://127.0.0.1:8080 --kind route --requests 300 --concurrency 16
    .venv/bin/python bench/load.py --url http://127.0.0.1:8080 --kind rewards --requests 300 --api-key KEY
    .venv/bin/python bench/load.py --url http://127.0.0.1:8080 --kind chat --requests 20 --concurrency 4

Kinds: `route` (`POST /v1/route`, a decision without generation), `chat` (`POST /v1/chat/completions`,
routed, `--max-tokens` per answer) and `rewards` (first `--requests` decisions through `/v1/route`, not
timed, then one `POST /v1/rewards` for each, timed). Prompts cycle through tests/data/two_kinds.jsonl.
Prints one JSON line: requests, concurrency, ok, errors by status (HTTP status, or the exception's name
when no response came back), p50/p99 latency in ms (successes only), throughput per second (successes
over the loop's wall time). Exit status 1 when any request failed.

`run_load` is the same loop for callers in Python (tests/router/test_load.py); its result also keeps
the decision ids made and the rewards acknowledged, so a caller can check them against the database.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's packages
from bench.overhead import percentile  # noqa: E402

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "two_kinds.jsonl"
Kind = Literal["route", "chat", "rewards"]
KINDS: tuple[str, ...] = ("route", "chat", "rewards")


def auth_headers(api_key: str | None) -> dict[str, str]:
    """What a client sends: `Authorization: Bearer <key>` when it has a key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def reward_for(decision_id: str) -> float:
    """A reward in [0, 1] that depends on the decision id only, so posting it again is a duplicate."""
    return int.from_bytes(hashlib.sha256(decision_id.encode()).digest()[:4], "big") % 1001 / 1000


def load_prompts() -> list[str]:
    with PROMPTS_FILE.open() as handle:
        return [json.loads(line)["prompt"] for line in handle if line.strip()]


@dataclass
class LoadResult:
    kind: str
    requests: int
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    decision_ids: list[str] = field(default_factory=list)  # decisions made (route, chat, rewards' setup)
    rewarded: dict[str, float] = field(default_factory=dict)  # decision id -> reward acknowledged (2xx)
    duplicates: int = 0  # rewards answered 2xx but `duplicate: true`

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    def fail(self, key: str, detail: str) -> None:
        self.errors[key] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{key}: {detail[:300]}")

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "requests": self.requests,
            "concurrency": self.concurrency,
            "ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "duplicates": self.duplicates,
            "p50_ms": _round(percentile(self.latencies_ms, 50)),
            "p99_ms": _round(percentile(self.latencies_ms, 99)),
            "throughput_per_s": _round(self.ok / self.elapsed_s if self.elapsed_s > 0 else None, 1),
            "elapsed_s": _round(self.elapsed_s),
            "error_samples": self.error_samples,
        }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


class RequestFailed(Exception):
    def __init__(self, key: str, detail: str) -> None:
        super().__init__(detail)
        self.key = key


async def _drive(result: LoadResult, total: int, concurrency: int, call: Callable[[int], Awaitable[None]]) -> None:
    """`call(i)` for every i < total, `concurrency` at a time; successes are timed, failures counted."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < total:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            try:
                await call(index)
            except RequestFailed as exc:
                result.fail(exc.key, str(exc))
            except httpx.HTTPError as exc:  # no response: connection refused or reset, timeout
                result.fail(type(exc).__name__, str(exc) or repr(exc))
            else:
                result.latencies_ms.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, total)))))
    result.elapsed_s = time.perf_counter() - started


def _check(response: httpx.Response) -> dict[str, Any]:
    if not 200 <= response.status_code < 300:
        raise RequestFailed(str(response.status_code), response.text)
    return response.json()


async def run_load(
    url: str,
    requests: int,
    concurrency: int,
    kind: Kind,
    api_key: str | None = None,
    *,
    decision_ids: list[str] | None = None,
    max_tokens: int = 8,
    timeout_s: float = 120.0,
    prompts: list[str] | None = None,
) -> LoadResult:
    """Run the load and return its result (see the module's docstring).

    `rewards` with `decision_ids` rewards those decisions (and `requests` is ignored); without, it first
    makes `requests` decisions (untimed; a failed one there raises).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if requests < 0 or concurrency < 1:
        raise ValueError("requests must be >= 0 and concurrency >= 1")
    prompts = prompts or load_prompts()
    url = url.rstrip("/")
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=auth_headers(api_key), timeout=timeout_s, limits=limits, trust_env=False) as client:

        def body(index: int) -> dict[str, Any]:
            return {"model": "auto", "messages": [{"role": "user", "content": prompts[index % len(prompts)]}], "max_tokens": max_tokens}

        async def decide(index: int, into: LoadResult) -> None:
            endpoint = "/v1/route" if kind != "chat" else "/v1/chat/completions"
            answer = _check(await client.post(url + endpoint, json=body(index)))
            into.decision_ids.append(answer["router"]["decision_id"])

        if kind == "rewards":
            if decision_ids is None:
                setup = LoadResult("route", requests, concurrency)
                await _drive(setup, requests, concurrency, lambda i: decide(i, setup))
                if setup.errors:
                    raise RuntimeError(f"making the decisions to reward failed: {setup.summary()}")
                decision_ids = setup.decision_ids
            result = LoadResult(kind, len(decision_ids), concurrency, decision_ids=list(decision_ids))

            async def reward(index: int) -> None:
                decision_id = result.decision_ids[index]
                value = reward_for(decision_id)
                answer = _check(await client.post(f"{url}/v1/rewards", json={"decision_id": decision_id, "reward": value}))
                result.rewarded[decision_id] = value
                result.duplicates += bool(answer.get("duplicate"))

            await _drive(result, len(result.decision_ids), concurrency, reward)
            return result

        result = LoadResult(kind, requests, concurrency)
        await _drive(result, requests, concurrency, lambda i: decide(i, result))
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bounded load on a running llm-router (loopback).")
    parser.add_argument("--url", required=True, help="router root, e.g. http://127.0.0.1:8080")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kind", choices=KINDS, default="route")
    parser.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens of each request (chat generates them)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per-request timeout")
    parser.add_argument("--quick", action="store_true", help="a smoke run (tests/bench/test_quick.py): 20 requests, 4 at a time")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.concurrency = 20, 4
    if args.requests < 0 or args.concurrency < 1:
        parser.error("--requests must be >= 0 and --concurrency >= 1")
    try:
        result = asyncio.run(run_load(args.url, args.requests, args.concurrency, args.kind, args.api_key,
                                      max_tokens=args.max_tokens, timeout_s=args.timeout_s))
    except RuntimeError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    print(json.dumps(result.summary()), flush=True)
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
