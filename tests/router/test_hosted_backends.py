"""A hosted OpenAI-compatible endpoint next to local vLLM: `api_key_env` and `headers` reach the upstream on
every call (chat, stream, health, models, metrics), the key never shows (config, logs, errors), and a
missing variable is a start-up error naming it. The upstream is a real HTTP server on loopback
(tests/fake_backend.py) that refuses `/v1/*` without the key and has no `/health`, as hosted APIs do."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from router.config import ConfigError, load_config
from tests.conftest import backend_table, write_config
from tests.fake_backend import FakeVLLM

KEY = "sk-test-0123456789abcdef"
HEADERS = {"OpenAI-Organization": "org-router", "X-Team": "search"}


@pytest.fixture
def hosted():
    server = FakeVLLM("hosted-model")
    server.api_key = KEY
    server.health_status = 404  # hosted APIs have no /health: /v1/models decides
    yield server
    server.close()


@pytest.fixture
def local():
    server = FakeVLLM("local")
    yield server
    server.close()


def _hosted_table(port: int, env: str = "HOSTED_API_KEY") -> str:
    return (backend_table("hosted", port, 2.5, 10.0).replace('model = "hosted"', 'model = "hosted-model"')
            + f'api_key_env = "{env}"\nheaders = {{ "OpenAI-Organization" = "org-router", "X-Team" = "search" }}\n')


def _sent(server: FakeVLLM, path: str) -> list[dict[str, str]]:
    return [headers for seen, headers in server.received_headers if seen == path]


def test_key_and_headers_reach_the_hosted_backend_on_every_call_and_never_show(tmp_path, sqlite_url, hosted, local, start_router,
                                                                                monkeypatch, caplog):
    monkeypatch.setenv("HOSTED_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    config = write_config(tmp_path / "router.toml", sqlite_url, backend_table("local", local.port, 0.1, 0.2) + _hosted_table(hosted.port))
    router = start_router(config)
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Say hello."}]
    assert client.chat.completions.create(model="hosted", messages=messages, max_tokens=8).choices[0].message.content == "hi"
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="hosted", messages=messages, max_tokens=8, stream=True) if c.choices) == "hi"
    deadline = time.monotonic() + 10
    while not (_sent(hosted, "/v1/models") and _sent(hosted, "/metrics")) and time.monotonic() < deadline:
        time.sleep(0.05)
    for path in ("/v1/chat/completions", "/health", "/v1/models", "/metrics"):
        assert _sent(hosted, path), f"no {path} call"
        for headers in _sent(hosted, path):
            assert headers["Authorization"] == f"Bearer {KEY}"
            assert {name: headers[name] for name in HEADERS} == HEADERS
    assert len(_sent(hosted, "/v1/chat/completions")) == 2  # the chat and the stream
    # The local backend gets neither the key nor the hosted one's headers.
    assert all("Authorization" not in h and "X-Team" not in h for _, h in local.received_headers)
    backends = {b["name"]: b for b in httpx.get(f"{router.url}/v1/backends").json()["backends"]}
    assert backends["hosted"]["healthy"] is True  # no /health (404), /v1/models lists the model
    shown = httpx.get(f"{router.url}/v1/config")
    hosted_config = next(b for b in shown.json()["backends"] if b["name"] == "hosted")
    assert hosted_config["api_key_env"] == "HOSTED_API_KEY" and hosted_config["headers"] == HEADERS
    # A wrong key: the upstream's 401 is the backend's failure (502), and the error names no key.
    hosted.api_key = "sk-rotated"
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="hosted", messages=messages, max_tokens=8)
    assert refused.value.status_code == 502 and "HTTP 401" in refused.value.message
    for text in (shown.text, caplog.text, refused.value.message, str(refused.value.body), repr(router.service.pool.state("hosted").spec),
                 httpx.get(f"{router.url}/v1/backends").text):
        assert KEY not in text


def test_a_missing_key_variable_is_a_start_up_error_naming_it(tmp_path, sqlite_url, hosted):
    config = write_config(tmp_path / "router.toml", sqlite_url, _hosted_table(hosted.port, env="NO_SUCH_ROUTER_KEY"))
    environ = {k: v for k, v in os.environ.items() if k != "NO_SUCH_ROUTER_KEY"}
    checked = subprocess.run([sys.executable, "-m", "router.cli", "config", "check", str(config)], env=environ,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 2
    assert "backend hosted: api_key_env: environment variable NO_SUCH_ROUTER_KEY is not set" in checked.stderr
    served = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--config", str(config), "--port", "1"], env=environ,
                            capture_output=True, text=True, timeout=120)
    assert served.returncode == 2 and "NO_SUCH_ROUTER_KEY is not set" in served.stderr
    checked = subprocess.run([sys.executable, "-m", "router.cli", "config", "check", str(config)],
                             env={**environ, "NO_SUCH_ROUTER_KEY": KEY}, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    assert KEY not in checked.stdout + checked.stderr


@pytest.mark.parametrize(("headers", "error"), [
    ('{ "Authorization" = "Bearer sk-x" }', "set the key through api_key_env"),
    ('{ "Bad Name" = "x" }', "not a valid HTTP header name"),
    ('{ "X-A" = "one\\r\\nX-Injected: two" }', "control characters"),
    ('{ "Host" = "example.com" }', "set by the router's HTTP client"),
    ('{ "X-A" = "1", "x-a" = "2" }', "headers named twice"),
    ('{ "X-A" = 1 }', "Input should be a valid string"),
])
def test_bad_headers_are_refused_at_load(tmp_path, headers, error):
    config = tmp_path / "router.toml"
    config.write_text(backend_table("hosted", 9, 1, 1) + f"headers = {headers}\n")
    with pytest.raises(ConfigError, match="backends.0.headers") as caught:
        load_config(config, environ={})
    assert error in str(caught.value)


def test_bad_key_variable_names_are_refused_at_load(tmp_path):
    config = tmp_path / "router.toml"
    config.write_text(backend_table("hosted", 9, 1, 1) + 'api_key_env = "sk-literal-key"\n')
    with pytest.raises(ConfigError, match="backends.0.api_key_env"):
        load_config(config, environ={})
