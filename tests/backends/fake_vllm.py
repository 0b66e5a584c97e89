"""A stand-in for the `vllm` command line: `vllm serve MODEL --served-model-name NAME --host H --port P ...`
serves tests/fake_backend.py's OpenAI-compatible server on that port, after `FAKE_VLLM_DELAY_S` seconds
(a slow start-up), with one worker process beside it (as vLLM's engine core). Each process it starts
writes its pid under `FAKE_VLLM_PIDS` (a directory), so a test can check that none outlives the router.

Tests put a `vllm` script that runs this first on PATH and configure backends with `managed = "vllm"`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fake_backend import FakeVLLM  # noqa: E402 - after the path


def _record(kind: str, pid: int) -> None:
    directory = os.environ.get("FAKE_VLLM_PIDS")
    if directory:
        Path(directory, f"{kind}-{pid}").write_text(str(pid))


def write_wrapper(directory: Path) -> Path:
    """A `vllm` executable in `directory` that runs this module with this interpreter."""
    wrapper = directory / "vllm"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("model")
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args()
    _record("server", os.getpid())
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    _record("worker", worker.pid)
    time.sleep(float(os.environ.get("FAKE_VLLM_DELAY_S", "0")))
    server = FakeVLLM(args.served_model_name, port=args.port)
    server.max_model_len = 2048
    print(f"fake vllm serving {args.served_model_name} on {args.port}", flush=True)
    threading.Event().wait()
    server.close()


if __name__ == "__main__":
    main()
