"""Every benchmark in bench/ runs in its quick mode, so none rots unnoticed (a renamed API, a config that no
longer starts, a missing key). Quick runs check that a script works end to end, not its figures.

Real parts: each script in its own process; overhead.py starts the real router (`llm-router serve`) in
front of two OpenAI-compatible servers on loopback (tests/fake_backend.py; with real vLLM it is the full
benchmark), load.py drives a real router over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import backend_table, write_config
from tests.fake_backend import FakeVLLM

ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{script} {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture
def fakes():
    servers = [FakeVLLM("fake-a"), FakeVLLM("fake-b")]
    yield servers
    for server in servers:
        server.close()


def test_every_bench_script_has_a_quick_mode():
    for script in sorted((ROOT / "bench").glob("*.py")):
        assert "--quick" in script.read_text(), f"{script.name} has no --quick mode"


def test_overhead_quick(tmp_path, fakes):
    out = tmp_path / "overhead.json"
    urls = ",".join(f"http://127.0.0.1:{server.port}" for server in fakes)
    run_script("overhead.py", "--quick", "--backends-from", urls, "--out", str(out))
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["results"] and report["targets"]
    assert sum(server.chats for server in fakes) > 0  # the pinned chat went through the router to a backend


def test_paired_quick(tmp_path, fakes):
    out = tmp_path / "paired.json"
    urls = ",".join(f"http://127.0.0.1:{server.port}" for server in fakes)
    run_script("paired.py", "--quick", "--base", str(ROOT), "--backends-from", urls, "--out", str(out))
    report = json.loads(out.read_text())
    assert {side: result["requests"] for side, result in report["results"].items()} == {"base": 10, "change": 10}
    assert all(result["p50_ms"] > 0 for result in report["results"].values())
    run_script("paired.py", "--quick", "--base", str(ROOT), "--backends-from", urls, "--endpoint", "chat", "--out", str(out))
    assert json.loads(out.read_text())["endpoint"] == "chat"
    assert sum(server.chats for server in fakes) >= 2 * 13, "every routed chat (warm-up included) reached a backend"


def test_load_quick(tmp_path, sqlite_url, fakes, start_router):
    backends = backend_table("fake-a", fakes[0].port, 0.1, 0.2) + backend_table("fake-b", fakes[1].port, 1.0, 2.0)
    router = start_router(write_config(tmp_path / "router.toml", sqlite_url, backends))
    for kind in ("route", "chat", "rewards"):
        summary = json.loads(run_script("load.py", "--url", router.url, "--quick", "--kind", kind).stdout.strip().splitlines()[-1])
        assert summary["ok"] == 20 and not summary["errors"], summary


def test_embedding_quick():
    output = run_script("embedding.py", "--quick").stdout
    assert "recall@10" in output and "fast-fp32" in output and "model-256-static" in output


def test_train_quick():
    output = run_script("train.py", "--quick", "--threads", "1").stdout
    assert "validation loss" in output


def test_train_overhead_quick():
    result = json.loads(run_script("train_overhead.py", "--quick").stdout)
    assert result["route_idle"]["n"] == 10 and result["runs"]


def test_memory_scale_quick(tmp_path):
    out = tmp_path / "memory_scale.json"
    run_script("memory_scale.py", "--quick", "--out", str(out), timeout_s=600)
    report = json.loads(out.read_text())
    assert report["route"]["failures"] == 0 and report["route"]["ok"] == 60
    assert report["recall"]["index"].startswith("ivf"), "the quick run is past the exact-search bound"
    assert report["recall"]["recall"] >= 0.9 and report["rss_mb"] > 0


def test_breakdown_quick():
    output = run_script("breakdown.py", "--quick").stdout
    assert "engine.decide" in output and "service.feedback, c=32" in output


def test_throughput_quick(tmp_path):
    out = tmp_path / "throughput.json"
    run_script("throughput.py", "--quick", "--out", str(out))  # exits 1 on a refused, lost or uncounted request
    report = json.loads(out.read_text())
    for endpoint in ("route", "rewards"):
        load = report["endpoints"][endpoint]
        assert load["requests"] > 0 and load["non_2xx"] == 0 and load["consistent"], (endpoint, load)


def test_modes_quick(tmp_path, fakes):
    """Every answer-aware mode through the service in process, the verified cascade included, on two
    OpenAI-compatible servers (the full run starts two CPU vLLM servers)."""
    out = tmp_path / "modes.json"
    urls = ",".join(f"http://127.0.0.1:{server.port}" for server in fakes)
    run_script("modes.py", "--quick", "--backends-from", urls, "--out", str(out))
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) == {"route", "cascade", "parallel", "fuse", "refine", "s2p", "cascade-verify"}
    assert modes["route"]["calls_per_prompt"] == 1 and modes["fuse"]["calls_per_prompt"] == 3
    assert modes["cascade-verify"]["calls_per_prompt"] == 3, "answer, a check that finds no Yes, the dear answer"


@pytest.mark.postgres
def test_replicas_quick(tmp_path):
    from tests.conftest import PG_URL

    out = tmp_path / "replicas.json"
    run_script("replicas.py", "--quick", "--replicas", "2", "--database-url", PG_URL, "--out", str(out), timeout_s=600)
    rows = json.loads(out.read_text())["results"]
    assert [row["replicas"] for row in rows] == ["1 (one process)", 2] and all(row["failures"] == 0 for row in rows)
