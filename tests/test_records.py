"""Issue 25: committed run records. A fresh clone reuses the records it has and runs only what is missing;
a record made by other code versions or on other data is run again; make compare stops on --max-hours
without losing a finished run, and prints its progress."""
import json
import shutil

from common import compare, versions

COMMITTED = ("summary.json", "metrics.jsonl", "test_scores.npy")   # what .gitignore lets into the repository


def grid(tmp, tiny_data, *more):
    return ["--only", "round_robin", "--seeds", "2", "--out", str(tmp), "--data", str(tiny_data),
            "--extra", "--model-size tiny --epochs 1 --batch-size 8", *more]


def clone_records(src, dst, keep):
    """What a fresh clone has of src's grid: the committed files of the runs in `keep` (seed folders) and
    index.json without the other runs' entries (no checkpoints, no logs)."""
    runs = src / "runs" / "quick"
    for path in runs.rglob("*"):
        if path.name in COMMITTED and any(part in keep for part in path.parts):
            target = dst / "runs" / "quick" / path.relative_to(runs)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    index = json.loads((runs / "index.json").read_text())
    index = {k: v for k, v in index.items() if k == "chosen" or any(s in k for s in keep)}
    (dst / "runs" / "quick" / "index.json").write_text(json.dumps(index))
    return index


def test_a_clone_with_half_the_records_runs_only_the_other_half(tiny_data, tmp_path, capsys):
    first, clone = tmp_path / "first", tmp_path / "clone"
    compare.main(grid(first, tiny_data))
    stored = json.loads((first / "runs/quick/index.json").read_text())
    assert all(not e["summary"].startswith("/") for k, e in stored.items() if k != "chosen")  # relative paths
    index = clone_records(first, clone, keep=["seed0"])
    assert len([k for k in index if k != "chosen"]) == 1
    kept = clone / "runs/quick/round_robin/seed0/summary.json"
    before = kept.stat().st_mtime
    capsys.readouterr()
    compare.main(grid(clone, tiny_data))
    out = capsys.readouterr().out
    assert kept.stat().st_mtime == before                           # reused, not trained again
    assert (clone / "runs/quick/round_robin/seed1/summary.json").exists()
    assert "starting final: round_robin seed1" in out and "starting final: round_robin seed0" not in out
    assert "2/2 done (1 reused)" in out
    rows = (clone / "compare.csv").read_text()
    assert rows.count("round_robin,") == 2


def test_a_stale_record_is_run_again(tiny_data, tmp_path, capsys):
    compare.main(grid(tmp_path, tiny_data))
    path = tmp_path / "runs/quick/round_robin/seed0/summary.json"
    summary = json.loads(path.read_text())
    assert versions.record_stale(path) is None
    summary["versions"]["script_version"] = 0                  # made by an older RULE_VERSION
    path.write_text(json.dumps(summary))
    assert "RULE_VERSION 0 -> 1" in versions.record_stale(path)
    other = tmp_path / "runs/quick/round_robin/seed1/summary.json"
    before = other.stat().st_mtime
    capsys.readouterr()
    compare.main(grid(tmp_path, tiny_data))
    assert "starting final: round_robin seed0" in capsys.readouterr().out
    assert versions.record_stale(path) is None and other.stat().st_mtime == before


def test_stale_reasons(monkeypatch):
    recorded = versions.run_versions("pcgrad", {"aggregator:pcgrad": 1, "weighting:equal": 1})
    assert versions.stale_reason(recorded) is None
    assert "no versions" in versions.stale_reason(None)
    assert "aggregator:pcgrad" in versions.stale_reason({**recorded, "rules": {"aggregator:pcgrad": 0}})
    monkeypatch.setattr(versions, "PROTOCOL_VERSION", versions.PROTOCOL_VERSION + 1)
    assert "protocol" in versions.stale_reason(recorded)


def test_max_hours_stops_and_the_next_call_finishes(tiny_data, tmp_path, capsys):
    compare.main(grid(tmp_path, tiny_data, "--max-hours", "0.0005"))   # 1.8 s: inside the first run
    out = capsys.readouterr().out
    assert "--max-hours 0.0005 reached" in out and "ETA" in out
    index = json.loads((tmp_path / "runs/quick/index.json").read_text())
    assert {e["status"] for k, e in index.items() if k != "chosen"} <= {"interrupted", "ok"}
    assert any(e["status"] == "interrupted" for k, e in index.items() if k != "chosen")
    compare.main(grid(tmp_path, tiny_data))
    index = json.loads((tmp_path / "runs/quick/index.json").read_text())
    assert {e["status"] for k, e in index.items() if k != "chosen"} == {"ok"}


def test_recorded_arguments_hold_repository_paths_relative():
    import argparse

    from common.arguments import recorded_args
    from common.versions import REPO
    args = argparse.Namespace(data=str(REPO / "data_prep" / "synthetic"), out="/elsewhere/results", init=None, lr=1e-3)
    assert recorded_args(args) == {"data": "data_prep/synthetic", "out": "/elsewhere/results", "init": None, "lr": 1e-3}


def test_make_compare_as_a_script_stops_its_running_scripts(tiny_data, tmp_path):
    """`python common/compare.py` runs as __main__: its stop (--max-hours here; SIGINT, SIGTERM alike) must
    reach the scripts it started, which checkpoint and end "interrupted". It did not while the stop flag lived
    in compare.py (launch.py imported a second copy of the module, with a flag of its own, so the running
    scripts trained on to their end); it lives in launch.py now."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(versions.REPO / "common" / "compare.py"),
                           *grid(tmp_path, tiny_data, "--max-hours", "0.0005")],
                          capture_output=True, text=True, cwd=versions.REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--max-hours 0.0005 reached" in proc.stdout
    index = json.loads((tmp_path / "runs/quick/index.json").read_text())
    assert any(e["status"] == "interrupted" for k, e in index.items() if k != "chosen"), index
