"""What each answer-aware mode costs on real backends: latency, time to first token, calls and cost.

    .venv/bin/python bench/modes.py                 # two managed vLLM CPU servers (SmolLM2-135M), 12 prompts per mode
    .venv/bin/python bench/modes.py --quick         # 2 prompts per mode: a smoke run
    .venv/bin/python bench/modes.py --backends-from http://127.0.0.1:8001,http://127.0.0.1:8002

Fuse, refine and s2p write new text, so recorded answers cannot replay them; this is where they are
measured. It builds the service in process (the real embedder, SQLite in a temp dir, the two backends
at two prices) and sends each prompt through every mode, plain and streamed: latency is the whole
answer, time to first token is the first streamed event (a mode that must see whole answers streams
the delivered one once chosen, so its first token comes at the end). No answer scorer is trained here,
so selection is by agreement and a cascade judged by the scorer stops after its first answer;
`cascade-verify` is judged by self-verification instead (one rewarded answer from each backend first puts
both on the cascade's frontier, the cheap one first). Prints one table and writes
the figures to `--out` (default var/bench/modes.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.launcher import BackendLauncher, LaunchTarget  # noqa: E402
from router.api.limits import routing_request  # noqa: E402
from router.api.protocol import ChatCompletionRequest  # noqa: E402
from router.config import load_config  # noqa: E402
from router.service import RouterService  # noqa: E402

# (label, the request's router options): the cascade twice, judged by the scorer (none is trained here, so
# it stops after its first answer) and by self-verification (one more call per answer but the last)
MODES = (*((m, {"mode": m}) for m in ("route", "cascade", "parallel", "fuse", "refine", "s2p")),
         ("cascade-verify", {"mode": "cascade", "judge": "verify"}))
PRICES = ((0.05, 0.10), (0.50, 1.50))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "tests" / "data" / "two_kinds.jsonl").read_text().splitlines()]
    return [row["prompt"][:400] for row in rows[:n]]


def _config(workdir: Path, urls: list[str]) -> Path:
    backends = "".join(
        f'[[backends]]\nname = "smol-{i}"\nbase_url = "{url}"\nmodel = "smol-{i}"\n'
        f"price_per_1m_input_tokens_usd = {PRICES[i][0]}\nprice_per_1m_output_tokens_usd = {PRICES[i][1]}\ntimeout_s = 120\n"
        for i, url in enumerate(urls)
    )
    path = workdir / "router.toml"
    path.write_text(f'database_url = "sqlite:///{workdir}/router.db"\nseed = 0\n[auth]\nopen_on_loopback = true\n'
                    f"[health]\ninterval_s = 600\n[modes]\nparallel_k = 2\n{backends}")
    return path


async def _warm_up(service: RouterService) -> None:
    """One rewarded answer from each backend (the dear one rated higher), so the cascade's frontier holds
    both: cheap first, then dear."""
    for name, reward in (("smol-0", 0.4), ("smol-1", 0.8)):
        body = {"model": name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
        _, routed = await service.chat(routing_request(ChatCompletionRequest.model_validate(body), service.config.limits))
        await service.feedback(routed.decision_id, None, reward=reward)


async def _measure(service: RouterService, prompts: list[str], max_tokens: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    await _warm_up(service)
    for mode, options in MODES:
        latencies, firsts, calls, costs = [], [], [], []
        for prompt in prompts:
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "router": options}
            request = routing_request(ChatCompletionRequest.model_validate(body), service.config.limits)
            started = time.perf_counter()
            _, routed = await service.chat(request)
            latencies.append((time.perf_counter() - started) * 1000)
            calls.append(max(1, len(routed.calls)))
            costs.append(routed.cost_usd or 0.0)
            started = time.perf_counter()
            events, _ = await service.chat_stream(routing_request(ChatCompletionRequest.model_validate({**body, "stream": True}),
                                                                  service.config.limits))
            await anext(events)
            firsts.append((time.perf_counter() - started) * 1000)
            async for _ in events:
                pass
        results[mode] = {
            "latency_p50_ms": round(statistics.median(latencies), 1),
            "ttft_p50_ms": round(statistics.median(firsts), 1),
            "calls_per_prompt": round(statistics.mean(calls), 2),
            "mean_cost_usd": statistics.mean(costs),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 prompts per mode")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--backends-from", help="comma-separated base URLs of two running OpenAI-compatible servers")
    parser.add_argument("--out", default=str(ROOT / "var" / "bench" / "modes.json"))
    args = parser.parse_args(argv)
    prompts = _prompts(2 if args.quick else args.prompts)
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        launcher = None
        if args.backends_from:
            urls = [u.strip() for u in args.backends_from.split(",")][:2]
        else:
            urls = [f"http://127.0.0.1:{_free_port()}" for _ in range(2)]
            targets = [LaunchTarget(f"smol-{i}", url, f"smol-{i}", "vllm-cpu", cpu_core=i, extra_args=("--max-num-seqs", "4"))
                       for i, url in enumerate(urls)]
            launcher = BackendLauncher(targets, workdir / "logs")
            launcher.start()
            launcher.wait_ready()
        try:
            service = RouterService(load_config(_config(workdir, urls), environ={}))

            async def run() -> dict[str, dict[str, float]]:
                try:
                    return await _measure(service, prompts, args.max_tokens)
                finally:
                    await service.close()

            results = asyncio.run(run())
        finally:
            if launcher is not None:
                launcher.stop()
    print(f"{'mode':14} {'latency p50 (ms)':>17} {'TTFT p50 (ms)':>14} {'calls/prompt':>13} {'mean cost (USD)':>16}")
    for mode, row in results.items():
        print(f"{mode:14} {row['latency_p50_ms']:>17} {row['ttft_p50_ms']:>14} {row['calls_per_prompt']:>13} {row['mean_cost_usd']:>16.3g}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompts": len(prompts), "max_tokens": args.max_tokens, "modes": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
