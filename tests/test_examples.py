"""Every config under examples/ passes `llm-router config check` (as `serve` would validate it), given
placeholder values for the environment variables it names (backend API keys, router keys)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").iterdir())


def _variables(config: dict) -> set[str]:
    """The environment variables a config reads keys from."""
    keys = config.get("auth", {}).get("keys", [])
    return {b["api_key_env"] for b in config.get("backends", []) if "api_key_env" in b} | {k["key_env"] for k in keys if "key_env" in k}


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"gpu-vllm-fleet.toml", "local-and-hosted.toml", "postgres-replicas.toml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_config_check(path: Path):
    text = path.read_text()
    assert text.startswith("#"), "an example opens with a comment saying what it is for"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ROUTER_") and k != "DATABASE_URL"}
    environ |= {name: f"placeholder-{name.lower()}" for name in _variables(tomllib.loads(text))}
    checked = subprocess.run([str(Path(sys.executable).parent / "llm-router"), "config", "check", str(path)],
                             env=environ, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    assert f"config file {path}: ok" in checked.stdout
