"""What a person running `llm-router replay` sees: plots for one policy too, cost axes on a log scale,
progress bars on a terminal and nothing on a pipe, and a short table at the end (JSON when piped)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import sys
import termios
import threading
import uuid
from pathlib import Path

import matplotlib.image
import pytest

from router.cli import main
from router.replay import plots

ROWS = [json.loads(line) for line in (Path(__file__).parent.parent / "data" / "two_kinds.jsonl").read_text().splitlines()]


def _data(tmp_path: Path, n: int = 40, free: bool = False) -> Path:
    """A routing file of real prompts, new to the embedding cache (a unique suffix), so the run embeds them.
    Model a costs nothing when `free`; c, the dear one, is what squashes a linear cost axis."""
    data, tag = tmp_path / "ux_routing.jsonl", uuid.uuid4().hex[:8]
    with data.open("w") as handle:
        for i, row in enumerate(ROWS[:n]):
            handle.write(json.dumps({
                "id": str(i), "prompt": f"{row['prompt']} ({tag})", "dataset": row["kind"], "prompt_tokens": 50,
                "outcomes": {"a": {"quality": 0.5 if row["kind"] == "math" else 0.2, "output_tokens": 10, "cost_usd": 0.0 if free else 6e-6},
                             "b": {"quality": 0.9, "output_tokens": 20, "cost_usd": 5e-5},
                             "c": {"quality": 0.95, "output_tokens": 20, "cost_usd": 5e-3}},
            }) + "\n")
    return data


@pytest.fixture
def saved(monkeypatch):
    """The figures the replay saves, by file name, inspected as they are written."""
    figures: dict[str, object] = {}
    original = plots._save

    def record(figure, target):
        figures[target.name] = figure
        return original(figure, target)

    monkeypatch.setattr(plots, "_save", record)
    return figures


def test_a_single_policy_gets_both_plots_with_a_log_cost_axis(tmp_path, capsys, saved):
    out = tmp_path / "out"
    assert main(["replay", "--data", str(_data(tmp_path)), "--policy", "thompson", "--out", str(out)]) == 0
    for name in ("running_quality.png", "cost_quality.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 500
    cost_axis = saved["cost_quality.png"].axes[0]
    assert cost_axis.get_xscale() == "log"
    low, high = cost_axis.get_xlim()
    assert low < 6e-6 and high > 5e-3  # the cheap model and the dear one both on the axis, decades apart
    labels = [t.get_text() for t in cost_axis.get_legend().get_texts()]
    assert labels == ["thompson"]
    assert json.loads(capsys.readouterr().out)["policy"] == "thompson"  # piped: the report as JSON


def test_a_free_model_keeps_its_point_on_a_symlog_cost_axis(tmp_path, capsys, saved):
    assert main(["replay", "--data", str(_data(tmp_path, free=True)), "--policy", "random,thompson", "--out", str(tmp_path / "out")]) == 0
    cost_axis = saved["cost_quality.png"].axes[0]
    assert cost_axis.get_xscale() == "symlog" and cost_axis.get_xlim()[0] <= 0
    assert (tmp_path / "out" / "cost_quality.png").stat().st_size > 10_000
    assert "| thompson |" in capsys.readouterr().out


def _on_a_terminal(args: list[str], monkeypatch) -> str:
    """Run the CLI with stderr on a real pseudo-terminal; what the terminal showed."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns, as a terminal window has
    shown = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal side closed
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with os.fdopen(terminal, "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        assert main(args) == 0
        monkeypatch.undo()
    reader.join(timeout=10)
    os.close(controller)
    return shown.decode(errors="replace")


def test_progress_bars_on_a_terminal_and_none_on_a_pipe(tmp_path, capsys, monkeypatch):
    data = _data(tmp_path)
    shown = _on_a_terminal(["replay", "--data", str(data), "--policy", "thompson,elo", "--seeds", "0,1", "--out", str(tmp_path / "a")],
                           monkeypatch)
    for bar in ("embedding prompts", "policies", "thompson, seed 0", "elo, seed 1"):
        assert bar in shown
    assert "it/s" in shown or "prompt/s" in shown
    capsys.readouterr()
    # The same run piped: no bar, no carriage return, nothing on stderr.
    assert main(["replay", "--data", str(_data(tmp_path)), "--policy", "thompson,elo", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr()
    assert out.err == "" and "\r" not in out.out


def test_training_shows_a_bar_on_a_terminal(tmp_path, monkeypatch, capsys):
    shown = _on_a_terminal(["replay", "--data", str(_data(tmp_path)), "--policy", "forc", "--train-fraction", "0.5",
                            "--out", str(tmp_path / "out")], monkeypatch)
    assert "training predictor" in shown


def test_a_terminal_gets_a_short_table_instead_of_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["replay", "--data", str(_data(tmp_path)), "--policy", "qlearning", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| policy |") and "| qlearning |" in printed and "| *oracle* |" in printed
    assert f"in {tmp_path / 'out'}/" in printed
    assert len(printed.splitlines()) < 15
    assert json.loads((tmp_path / "out" / "report.json").read_text())["policy"] == "qlearning"
