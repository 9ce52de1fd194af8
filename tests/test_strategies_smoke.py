"""Every strategy script runs a few steps on tiny data, then resumes from its checkpoint and finishes.
The scripts run in this process (runpy, as `python strategies/x.py` would) to spare the start-up cost."""
import json
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (REPO / "strategies").glob("*.py") if not p.stem.startswith("_"))
EXTRA = {"curriculum": ["--probe-steps", "2", "--entry-every", "1"], "dynamic_sampling": ["--interval", "2"],
         "task_grouping": ["--affinity-every", "1"]}


def run(script, tiny_data, out, capsys, monkeypatch, *args):
    argv = [f"{script}.py", "--data", str(tiny_data), "--out", str(out), "--model-size", "tiny", "--epochs", "1",
            "--batch-size", "4", "--eval-every", "2", "--checkpoint-every", "2", "--log-every", "1", "--quiet",
            *EXTRA.get(script, []), *args]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "strategies" / f"{script}.py"), run_name="__main__")
    return capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_and_resumes(script, tiny_data, tmp_path, capsys, monkeypatch):
    first = run(script, tiny_data, tmp_path, capsys, monkeypatch, "--max-steps", "4")
    resumed = run(script, tiny_data, tmp_path, capsys, monkeypatch, "--max-steps", "6", "--resume")
    summaries = [line.split("summary: ", 1)[1] for line in resumed.splitlines() if line.startswith("summary: ")]
    assert summaries, resumed
    summary = json.loads(Path(summaries[-1]).read_text())
    assert summary["test"]["mean"]["f1_macro"] >= 0
    assert summary["nonfinite_skips"] == 0
    if script != "single_task":
        assert "resumed from" in resumed
    if script not in ("single_task", "task_grouping", "sequential"):  # several models / early phase ends
        assert summary["steps"] == 6
    assert "summary: " in first
