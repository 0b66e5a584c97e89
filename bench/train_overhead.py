"""Routing latency while the predictors retrain: idle vs during a training run in the worker process.

    .venv/bin/python bench/train_overhead.py --data ../shared/data/llmrouter_routing.jsonl --samples 3000

Builds the routing service `serve` runs (SQLite in a temp dir, `forc` and `hybrid` active with
`thompson`, the real embedder and predictors), imports `--samples` prompts of the file as history, trains
once in the foreground so the predictors are in the request path, then measures `service.route()`
(embedding, predictor inference, recall, policies, durable write) at concurrency 1: first idle, then
while the scheduler's worker process (its own `--threads` torch threads) trains again. Prints one JSON
object with both p50/p99, their ratio, and the training run (duration, samples, promoted).
No backend is called (`route` decides only), so none is started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router.api.limits import routing_request  # noqa: E402
from router.api.protocol import ChatCompletionRequest  # noqa: E402
from router.config import load_config  # noqa: E402
from router.history import import_file  # noqa: E402
from router.service import RouterService  # noqa: E402
from router.training import TrainingScheduler, run_training  # noqa: E402


def _percentiles(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:  # e.g. a quick run whose training ended before the measurement began
        return {"p50_ms": None, "p99_ms": None, "n": 0}
    return {"p50_ms": round(ordered[len(ordered) // 2], 2), "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1], 2), "n": len(ordered)}


async def _route_latencies(service: RouterService, prompts: list[str], stop: asyncio.Event | None, limit: int) -> list[float]:
    latencies = []
    for index in range(limit):
        if stop is not None and stop.is_set():
            break
        request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": prompts[index % len(prompts)]}], "max_tokens": 64})
        started = time.perf_counter()
        await service.route(routing_request(request, service.config.limits))
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def main(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="train-overhead-"))
    lines = [line for line in Path(args.data).read_text().split("\n") if line.strip()]
    random.Random(0).shuffle(lines)
    history = workdir / "history.jsonl"
    history.write_text("\n".join(lines[: args.samples]) + "\n")
    probes = [json.loads(line)["prompt"][:2000] for line in lines[args.samples : args.samples + 500]]
    models = list(json.loads(lines[0])["outcomes"])
    backends = "".join(
        f'[[backends]]\nname = "{m}"\nbase_url = "http://127.0.0.1:9"\nmodel = "{m}"\n'
        f"price_per_1m_input_tokens_usd = {0.1 * (i + 1)}\nprice_per_1m_output_tokens_usd = {0.2 * (i + 1)}\n"
        for i, m in enumerate(models)
    )
    config_path = workdir / "router.toml"
    config_path.write_text(
        f'database_url = "sqlite:///{workdir}/router.db"\npolicies = ["forc", "hybrid", "thompson"]\ndefault_policy = "forc"\n'
        f'[auth]\nopen_on_loopback = true\n[predictors]\nartifacts_dir = "{workdir}/artifacts"\nschedule = "off"\n'
        f"threads = {args.threads}\nepochs = {args.epochs}\nmin_samples = 10\n{'max_length = 32' if args.quick else ''}\n{backends}"
    )
    config = load_config(config_path, environ={})
    service = RouterService(config)
    import_file(service.db, history)
    first = run_training(config.model_copy(update={"predictors": config.predictors.model_copy(update={"threads": os.cpu_count()})}), "bench")
    service.predictors.reload()
    await _route_latencies(service, probes, None, 2 if args.quick else 20)  # warm-up
    idle = await _route_latencies(service, probes, None, args.requests)
    scheduler = TrainingScheduler(config, lambda runs: asyncio.sleep(0))
    stop = asyncio.Event()
    started = time.perf_counter()
    training = asyncio.ensure_future(scheduler.run("bench"))
    training.add_done_callback(lambda _: stop.set())
    await asyncio.sleep(1 if args.quick else 5)  # past the worker's start-up, into training
    during = await _route_latencies(service, probes, stop, 10**9)
    runs = await training
    scheduler.shutdown()
    await service.close()
    result = {
        "samples": args.samples, "threads": args.threads, "epochs": args.epochs, "cores": os.cpu_count(),
        "foreground_training_s": {r["kind"]: round(r["duration_s"], 1) for r in first},
        "route_idle": _percentiles(idle), "route_during_training": _percentiles(during),
        "training_wall_s": round(time.perf_counter() - started, 1),
        "runs": [{k: r[k] for k in ("kind", "status", "duration_s", "samples_train", "validation_loss", "baseline_loss", "promoted")} for r in runs],
    }
    during_p99, idle_p99 = result["route_during_training"]["p99_ms"], result["route_idle"]["p99_ms"]
    result["p99_ratio"] = round(during_p99 / idle_p99, 2) if during_p99 and idle_p99 else None
    return result


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data")
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (tests/bench/test_quick.py): 30 prompts of tests/data, 1 epoch of length 32, 10 requests")
    args = parser.parse_args(argv)
    if args.quick:
        args.data = args.data or str(Path(__file__).resolve().parents[1] / "tests" / "data" / "llmrouter_sample.jsonl")
        args.samples, args.epochs, args.requests = 30, 1, 10
    if not args.data:
        parser.error("--data is required (or --quick)")
    print(json.dumps(asyncio.run(main(args)), indent=1))


if __name__ == "__main__":
    cli()
