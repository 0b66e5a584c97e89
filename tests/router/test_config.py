import subprocess
import sys
from pathlib import Path

import pytest

from router.config import ConfigError, load_config
from tests.conftest import backend_table, write_config


def test_embedded_defaults_load_with_two_managed_vllm_backends():
    config = load_config(None, environ={})
    assert [b.name for b in config.backends] == ["smol-small", "smol-large"]
    assert all(b.managed == "vllm-cpu" for b in config.backends)
    assert config.database_url.startswith("sqlite:///")
    assert config.policy_names[0] == config.default_policy


def test_environment_overrides_file_values(tmp_path: Path):
    path = write_config(tmp_path / "c.toml", "sqlite:///a.db", backend_table("a", 1, 0.1, 0.2))
    config = load_config(
        path,
        environ={
            "DATABASE_URL": "postgresql://u@h/db",
            "LLM_ROUTER_DEFAULT_POLICY": "random",
            "LLM_ROUTER_SERVER__PORT": "9999",
            "LLM_ROUTER_POLICIES": "random, qlearning",
        },
    )
    assert config.database_url == "postgresql://u@h/db"
    assert config.default_policy == "random"
    assert config.server.port == 9999
    assert config.policies == ["random", "qlearning"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (backend_table("a", 1, -1.0, 0.2), "backends.0.price_per_1m_input_tokens_usd"),
        (backend_table("a", 1, 0.1, 0.2) + backend_table("a", 2, 0.1, 0.2), "duplicate backend names"),
        (backend_table("a", 1, 0.1, 0.2) + 'colour = "blue"\n', "backends.0.colour"),
        ('default_policy = "nope"\n' + backend_table("a", 1, 0.1, 0.2), "default_policy"),
        ("", "backends"),
        ("this is = = not toml", "not valid TOML"),
    ],
)
def test_bad_config_names_the_bad_field(tmp_path: Path, body: str, named: str):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(path, environ={})


def test_missing_config_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="missing.toml"):
        load_config(tmp_path / "missing.toml", environ={})


def test_serve_with_bad_config_exits_nonzero_naming_the_field(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text(backend_table("a", 1, 0.1, 0.2).replace("timeout_s = 60.0", "timeout_s = -3"))
    result = subprocess.run(
        [sys.executable, "-m", "router.cli", "serve", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "backends.0.timeout_s" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "extra, says",
    [
        ('[[auth.keys]]\nname = "a"\n', "exactly one of key_sha256 or key_env"),
        ('[[auth.keys]]\nname = "a"\nkey_sha256 = "abc"\n', "auth.keys.0.key_sha256"),
        ('[[auth.keys]]\nname = "a"\nkey_env = "K"\n[[auth.keys]]\nname = "a"\nkey_env = "L"\n', "duplicate key names"),
        ("[breaker]\nopen_s = 10\nmax_open_s = 5\n", "open_s must not exceed max_open_s"),
        ('[predictors]\ncron = "every day"\n', "not a crontab line"),
        ('[predictors]\nhybrid_small = "nope"\n', "predictors.hybrid_small: unknown backend"),
        ("[limits]\nmax_tokens = 0\n", "limits.max_tokens"),
    ],
)
def test_security_failover_and_predictor_settings_are_validated(tmp_path: Path, extra: str, says: str):
    path = write_config(tmp_path / "c.toml", "sqlite:///a.db", backend_table("a", 1, 0.1, 0.2), extra)
    with pytest.raises(ConfigError, match=says):
        load_config(path, environ={})


def test_hybrid_pair_defaults_to_the_cheapest_and_dearest_backend(tmp_path: Path):
    backends = backend_table("mid", 1, 0.5, 1.0) + backend_table("cheap", 2, 0.1, 0.2) + backend_table("dear", 3, 2.0, 8.0)
    config = load_config(write_config(tmp_path / "c.toml", "sqlite:///a.db", backends), environ={})
    assert config.hybrid_pair() == ("cheap", "dear")
