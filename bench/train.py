"""Training benchmark: FORC with the default backbone (the packaged MiniLM) on recorded outcomes.

Run from the repository root (the shared routing data must lie in ../shared/data):

    .venv/bin/python bench/train.py
    .venv/bin/python bench/train.py --samples 3000 --threads 2 --epochs 2 --trainable-layers 3

`--samples` prompts are drawn at random from `--data` (each with every model's outcome); the last 20% in
that random order validate. It prints the sample counts, the wall time and CPU time of training
(including loading the backbone and scoring the validation split), the load average (the machine may be
busy with other work, which stretches wall time), and the validation loss against a constant predictor
(the per-backend training means). Target: at most 10 minutes for 3,000 samples on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from router.predictors import TrainSettings, outcomes_from_jsonl, train_forc  # noqa: E402 - after the path and env


def main(argv: list[str] | None = None) -> None:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "llmrouter_routing.jsonl")
    parser.add_argument("--samples", type=int, default=3000, help="prompts drawn from --data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--trainable-layers", type=int, default=defaults.trainable_layers)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in seconds (tests/bench/test_quick.py): 40 prompts of tests/data, 1 epoch, length 32")
    args = parser.parse_args(argv)
    if args.quick:
        args.data, args.samples, args.epochs, args.max_length = ROOT / "tests" / "data" / "llmrouter_sample.jsonl", 40, 1, 32

    outcomes = outcomes_from_jsonl(args.data, prompts=args.samples)
    backends = sorted({outcome.backend for outcome in outcomes})
    settings = TrainSettings(
        threads=args.threads, epochs=args.epochs, max_length=args.max_length, trainable_layers=args.trainable_layers
    )
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    print(f"data: {args.data.name}, {args.samples} prompts x {len(backends)} backends; settings {settings.model_dump()}")
    cpu_started = time.process_time()
    result = train_forc(outcomes, backends, settings)
    cpu_s = time.process_time() - cpu_started
    print(f"load average {os.getloadavg()[0]:.1f} at end (1-minute)")
    print(f"samples: {result.samples.train} train + {result.samples.validation} validation prompts, "
          f"{result.samples.outcomes} outcomes")
    print(f"duration: {result.duration_s:.0f} s wall, {cpu_s:.0f} s CPU ({args.threads} threads)")
    improvement = 1 - result.validation_loss / result.baseline_loss
    print(f"validation loss {result.validation_loss:.4f} vs constant baseline {result.baseline_loss:.4f} "
          f"({improvement:+.1%} better)")


if __name__ == "__main__":
    main()
