"""Managed backends are owned by the router: they die with it however it ends, a taken port is a clear
error, SIGINT and SIGTERM stop them at every phase, and one that exits is restarted with backoff.

Real processes throughout: `llm-router serve` and the launcher in subprocesses, and a stand-in `vllm`
command (tests/backends/fake_vllm.py: a real HTTP server plus a worker process) so that these run in
seconds; tests/router/test_cli.py does the same with real vLLM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from backends.launcher import BackendLauncher, LaunchError, LaunchTarget
from tests.backends.fake_vllm import write_wrapper
from tests.conftest import backend_table, free_port, write_config

ROOT = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def recorded_pids(directory: Path) -> dict[str, list[int]]:
    pids: dict[str, list[int]] = {"server": [], "worker": []}
    for entry in directory.iterdir():
        kind, pid = entry.name.split("-")
        pids[kind].append(int(pid))
    return pids


@pytest.fixture
def fake_vllm_env(tmp_path, monkeypatch):
    """`vllm` on PATH is the stand-in; its processes' pids land in tmp_path/pids."""
    bin_dir, pids = tmp_path / "bin", tmp_path / "pids"
    bin_dir.mkdir()
    pids.mkdir()
    write_wrapper(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_VLLM_PIDS", str(pids))
    return pids


def _target(name: str, port: int) -> LaunchTarget:
    return LaunchTarget(name, f"http://127.0.0.1:{port}", name, "vllm", model="/models/fake")


def test_a_killed_router_takes_its_servers_and_their_workers_with_it(tmp_path, fake_vllm_env):
    ports = [free_port(), free_port()]
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from backends.launcher import BackendLauncher, LaunchTarget
        targets = [LaunchTarget(f"b{{i}}", f"http://127.0.0.1:{{p}}", f"b{{i}}", "vllm", model="/m") for i, p in enumerate({ports})]
        launcher = BackendLauncher(targets, Path({str(tmp_path / 'logs')!r}))
        launcher.start(); launcher.wait_ready(30); launcher.supervise()
        print(" ".join(map(str, launcher.pids())), flush=True)
        time.sleep(600)
    """)
    router = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        guards = [int(pid) for pid in router.stdout.readline().split()]
        assert len(guards) == 2, "the launcher did not come up"
        pids = recorded_pids(fake_vllm_env)
        everything = guards + pids["server"] + pids["worker"]
        assert len(everything) == 6 and all(alive(pid) for pid in everything)
        router.send_signal(signal.SIGKILL)  # no clean-up code of the router runs
        router.wait(timeout=10)
        wait_until(lambda: not any(alive(pid) for pid in everything), 10, "every managed process to exit")
        for port in ports:
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    finally:
        router.kill()


def test_a_taken_port_is_an_error_naming_it_and_nothing_starts(tmp_path, fake_vllm_env):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        launcher = BackendLauncher([_target("free", free_port()), _target("busy", taken)], tmp_path)
        with pytest.raises(LaunchError, match=f"port {taken} on 127.0.0.1 \\(backend busy\\) is already in use.*does not adopt"):
            launcher.start()
    assert recorded_pids(fake_vllm_env) == {"server": [], "worker": []}


def test_a_server_that_exits_is_restarted_with_backoff(tmp_path, fake_vllm_env):
    port = free_port()
    launcher = BackendLauncher([_target("flaky", port)], tmp_path, restart_backoff_s=0.3, max_backoff_s=2.0)
    with launcher:
        first = launcher.describe("flaky")
        assert first["running"] and first["restarts"] == 0 and first["last_exit_code"] is None
        server = recorded_pids(fake_vllm_env)["server"][0]
        os.kill(server, signal.SIGKILL)  # the server dies; its guard clears the group and exits
        wait_until(lambda: launcher.describe("flaky")["restarts"] == 1 and launcher.describe("flaky")["running"], 15, "a restart")
        state = launcher.describe("flaky")
        assert state["last_exit_code"] == 128 + signal.SIGKILL and state["backoff_s"] == pytest.approx(0.3)
        assert "exited with code" in state["last_error"] and state["pid"] != first["pid"]
        wait_until(lambda: _healthy(port), 15, "the restarted server to answer")
        os.kill(max(recorded_pids(fake_vllm_env)["server"]), signal.SIGKILL)  # again, soon after: a longer wait
        wait_until(lambda: launcher.describe("flaky")["restarts"] == 2, 15, "a second restart")
        assert launcher.describe("flaky")["backoff_s"] == pytest.approx(0.6)
    pids = recorded_pids(fake_vllm_env)
    wait_until(lambda: not any(alive(p) for p in pids["server"] + pids["worker"]), 10, "everything to stop")


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _serve(tmp_path: Path, config: Path, router_port: int) -> subprocess.Popen:
    env = {**os.environ, "LLM_ROUTER_LOG_DIR": str(tmp_path / "logs")}
    return subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", "--config", str(config), "--port", str(router_port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _managed_config(tmp_path: Path, ports: list[int]) -> Path:
    backends = "".join(backend_table(f"m{i}", port, 0.1, 0.2) + 'managed = "vllm"\nlaunch_model = "/models/fake"\n'
                       for i, port in enumerate(ports))
    return write_config(tmp_path / "router.toml", f"sqlite:///{tmp_path / 'r.db'}", backends)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_stops_the_backends_already_started(tmp_path, fake_vllm_env, monkeypatch, sig):
    monkeypatch.setenv("FAKE_VLLM_DELAY_S", "60")  # a slow start-up, as vLLM's ~40 s
    process = _serve(tmp_path, _managed_config(tmp_path, [free_port(), free_port()]), free_port())
    try:
        wait_until(lambda: len(recorded_pids(fake_vllm_env)["worker"]) == 2, 30, "the backends to be starting")
        pids = recorded_pids(fake_vllm_env)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert f"{signal.Signals(sig).name}: stopping" in stderr and "Traceback" not in stderr
    wait_until(lambda: not any(alive(p) for p in pids["server"] + pids["worker"]), 10, "every managed process to exit")


def test_serve_on_taken_ports_fails_naming_the_port(tmp_path, fake_vllm_env):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        process = _serve(tmp_path, _managed_config(tmp_path, [free_port(), taken]), free_port())
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 1 and f"port {taken} on 127.0.0.1 (backend m1) is already in use" in stderr, stderr
        assert "stopping managed backends" not in stderr  # nothing was started
        router = _serve(tmp_path, _managed_config(tmp_path, [free_port()]), taken)
        _, stderr = router.communicate(timeout=60)
        assert router.returncode == 1 and f"port {taken} on 127.0.0.1 is already in use" in stderr, stderr
    assert recorded_pids(fake_vllm_env) == {"server": [], "worker": []}


def test_serve_restarts_a_backend_that_exits_and_sigterm_stops_everything(tmp_path, fake_vllm_env):
    router_port, backend_port = free_port(), free_port()
    process = _serve(tmp_path, _managed_config(tmp_path, [backend_port]), router_port)
    url = f"http://127.0.0.1:{router_port}"
    try:
        wait_until(lambda: _ready(url, process), 120, "the router to be ready")
        managed = httpx.get(f"{url}/v1/backends").json()["backends"][0]["managed"]
        assert managed["running"] and managed["restarts"] == 0 and managed["log"].endswith("m0.log")
        os.kill(recorded_pids(fake_vllm_env)["server"][0], signal.SIGKILL)
        wait_until(lambda: httpx.get(f"{url}/v1/backends").json()["backends"][0]["managed"]["restarts"] == 1, 30, "the restart")
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200 and _healthy(backend_port), 30, "the backend back")
        pids = recorded_pids(fake_vllm_env)
        assert len(pids["server"]) == 2
        process.send_signal(signal.SIGTERM)  # while serving: uvicorn's graceful stop, then the backends
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    wait_until(lambda: not any(alive(p) for p in pids["server"] + pids["worker"]), 10, "every managed process to exit")


def _ready(url: str, process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"llm-router exited with {process.returncode}: {process.stderr.read()}")
    try:
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
