"""`llm-router config check FILE` validates as `serve` would and starts nothing; a bad environment override
is blamed on its variable, not on the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router.config import ConfigError, default_config_text, load_config
from tests.conftest import backend_table, free_port, write_config

ROOT = Path(__file__).resolve().parents[2]


def _check(path: Path | str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router.cli", "config", "check", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=env)


def test_a_bad_environment_override_is_blamed_on_its_variable():
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"LLM_ROUTER_SERVER__PORT": "eighty"})
    message = str(caught.value)
    assert message.startswith("environment LLM_ROUTER_SERVER__PORT: server.port:") and "embedded defaults" not in message
    with pytest.raises(ConfigError) as both:  # a file error and an environment error: each blamed on its source
        load_config(None, {"LLM_ROUTER_SERVER__PORT": "99999", "LLM_ROUTER_SNAPSHOT_EVERY": "0"})
    assert "environment LLM_ROUTER_SERVER__PORT: server.port" in str(both.value)
    assert "environment LLM_ROUTER_SNAPSHOT_EVERY: snapshot_every" in str(both.value)


def test_a_bad_file_value_is_blamed_on_the_file(tmp_path):
    path = tmp_path / "router.toml"
    path.write_text(default_config_text().replace("interval_s = 5.0", "interval_s = -1"))
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"LLM_ROUTER_SERVER__PORT": "9000"})
    assert str(caught.value).startswith(f"config file {path}: health.interval_s:") and "environment" not in str(caught.value)


def test_config_check_accepts_a_good_file_and_starts_nothing(tmp_path):
    port = free_port()
    managed = backend_table("local", port, 0.1, 0.2) + 'managed = "vllm-cpu"\n'
    config = write_config(tmp_path / "router.toml", f"sqlite:///{tmp_path / 'r.db'}", managed)
    result = _check(config)
    assert result.returncode == 0, result.stderr
    assert "ok: 1 backends (local; managed: local)" in result.stdout
    assert not (tmp_path / "r.db").exists()  # no database made, no server started


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("backends = []\n", "backends: List should have at least 1 item"),
        ("not toml [", "not valid TOML"),
        (backend_table("gpu", 8001, 0.1, 0.2) + 'managed = "vllm"\n[auth]\nopen_on_loopback = true\n', "launch_model"),
        (backend_table("a", 8001, 0.1, 0.2), "no [[auth.keys]] configured"),
        ('database_url = "::nonsense::"\n[auth]\nopen_on_loopback = true\n' + backend_table("a", 8001, 0.1, 0.2), "database"),
    ],
)
def test_config_check_refuses_a_bad_file_with_the_reason(tmp_path, text, says):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = _check(path)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_names_a_missing_file(tmp_path):
    result = _check(tmp_path / "missing.toml")
    assert result.returncode == 2 and "missing.toml" in result.stderr
