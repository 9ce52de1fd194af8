"""Issue 25: committed run records. A fresh clone reuses the records it has and runs only what is missing;
a record made by other code versions or on other data is run again; make compare stops on --max-hours
without losing a finished run, and prints its progress."""
import gzip
import json
import shutil

import numpy as np
import pytest
from scipy.stats import rankdata

from common import compare, figures, records, stats, versions

COMMITTED = ("summary.json", "metrics.jsonl.gz", "test_scores.npy")   # what .gitignore lets into the repository


def grid(tmp, tiny_data, *more):
    # --jobs 2: the two seeds at once (a tiny run is mostly its process start-up, which the cores share well)
    return ["--only", "round_robin", "--seeds", "2", "--jobs", "2", "--out", str(tmp), "--data", str(tiny_data),
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
    seed0 = first / "runs/quick/round_robin/seed0"           # lean as soon as it finished (common/records.py)
    assert np.load(seed0 / "test_scores.npy").dtype == np.uint16
    assert (seed0 / "metrics.jsonl.gz").exists() and not (seed0 / "metrics.jsonl").exists()
    assert records.read_log(records.log_path(seed0))[0]["event"] == "start"
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
    interrupted = {k: e for k, e in index.items() if k != "chosen" and e["status"] == "interrupted"}
    assert interrupted and all(e["seconds"] > 0 and e["cpu_seconds"] > 0 for e in interrupted.values())
    assert "unfinished grid: " in (tmp_path / "compare.md").read_text()          # the table says it is partial
    compare.main(grid(tmp_path, tiny_data))
    index = json.loads((tmp_path / "runs/quick/index.json").read_text())
    assert {e["status"] for k, e in index.items() if k != "chosen"} == {"ok"}
    for key, before in interrupted.items():
        if "] resumed from " in (tmp_path / "runs/quick" / index[key]["log"]).read_text():
            # continued from its checkpoint: its time is the sum over both attempts
            assert index[key].get("resumed") and not index[key].get("seconds_partial")
            assert index[key]["seconds"] > before["seconds"] and index[key]["cpu_seconds"] > before["cpu_seconds"]
        else:  # stopped in its start-up, before a checkpoint: it started again, and its time is its own
            assert "resumed" not in index[key]
    assert "unfinished grid" not in (tmp_path / "compare.md").read_text()


FAKE_SCRIPT = """import sys, time
from pathlib import Path
args = sys.argv[1:]
run = Path(args[args.index("--out") + 1]) / "fake" / "seed0"
run.mkdir(parents=True, exist_ok=True)
if "--resume" in args and (run / "checkpoint.pt").exists():
    print(f"[fake] resumed from {run / 'checkpoint.pt'} at step 3")
time.sleep(0.3)
(run / "summary.json").write_text("{}")
print(f"summary: {run / 'summary.json'}")
"""


def test_a_resumed_run_sums_its_attempts_time_and_a_fresh_restart_does_not(tmp_path, monkeypatch):
    """launch.execute on a scripted strategy: an unfinished entry is run again with --resume; the time of
    an attempt that continued from its checkpoint adds the earlier attempt's (marked partial when that
    entry kept none), one that found no checkpoint started fresh: its time is its own, not marked resumed."""
    from common import launch
    (tmp_path / "strategies").mkdir()
    (tmp_path / "strategies" / "fake.py").write_text(FAKE_SCRIPT)
    monkeypatch.setattr(launch, "REPO", tmp_path)
    root, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    interrupted = {"status": "interrupted", "seconds": 100.0, "cpu_seconds": 90.0, "settings": ["s"]}

    def attempt(entry):
        index = {"k": dict(entry)} if entry else {}
        return launch.execute("k", ["fake"], root, ["s"], 1, index, logs)

    first = attempt(None)
    assert first["status"] == "ok" and 0.3 <= first["seconds"] < 100 and "resumed" not in first
    fresh = attempt(interrupted)                      # no checkpoint: it started again from nothing
    assert fresh["status"] == "ok" and fresh["seconds"] < 100 and fresh["cpu_seconds"] < 90
    assert "resumed" not in fresh and "seconds_partial" not in fresh
    (root / "fake" / "seed0" / "checkpoint.pt").write_bytes(b"")
    continued = attempt(interrupted)
    assert continued["resumed"] and "seconds_partial" not in continued
    assert continued["seconds"] >= 100.3 and continued["cpu_seconds"] >= 90
    timeless = attempt({"status": "interrupted", "settings": ["s"]})   # older code kept no time
    assert timeless["resumed"] and timeless["seconds_partial"] and timeless["seconds"] < 100
    assert "resumed from" in (logs / "k.log").read_text()  # the log keeps every attempt


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


def test_ranks_keep_every_average_precision_of_the_scores():
    """The lean test scores (dense ranks) give the AP of the scores, ties included, on the full test set and on
    every bootstrap resample of it: AP reads only the order of the scores and their ties."""
    rng = np.random.default_rng(0)
    scores = rng.random((400, 3)).astype(np.float32)
    scores[:50, 0] = 0.5                                    # a tied group
    scores[50:60, 1] = scores[60:70, 1]                     # ties spread through the order
    labels = (rng.random((400, 3)) < 0.3).astype(float)
    ranks = records.dense_ranks(scores)
    assert ranks.dtype == np.uint16
    assert all(np.array_equal(ranks[:, t] + 1, rankdata(scores[:, t], method="dense")) for t in range(3))
    weights = stats.clip_weights(400, 50, rng)
    assert np.array_equal(stats.bootstrap_task_ap(ranks, labels, weights), stats.bootstrap_task_ap(scores, labels, weights))


def test_make_lean_is_lossless_for_the_log_and_idempotent(tmp_path):
    run, sub_run = tmp_path / "seed0", tmp_path / "seed0" / "gory"      # a run and one of its sub-runs
    sub_run.mkdir(parents=True)
    lines = [{"event": "start", "train_clips": 64}, {"event": "val", "step": 3, "per_task": {"gory": {"ap": 0.1234567891234}}}]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    scores = np.random.default_rng(1).random((30, 2)).astype(np.float32)
    for folder in (run, sub_run):
        (folder / "metrics.jsonl").write_text(text)
        np.save(folder / "test_scores.npy", scores)
    records.make_lean(run)
    first = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    records.make_lean(run)                                    # again: nothing changes
    assert first == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for folder in (run, sub_run):
        assert gzip.decompress((folder / "metrics.jsonl.gz").read_bytes()).decode() == text
        assert records.read_log(records.log_path(folder)) == lines
        assert np.array_equal(np.argsort(np.load(folder / "test_scores.npy"), axis=0), np.argsort(scores, axis=0))
    assert figures.run_logs({"_path": str(run / "summary.json")}) == [run / "metrics.jsonl.gz"]   # the figures read it


def test_every_committed_record_of_the_standard_grid_is_current():
    """The verdict (results/compare.md) is drawn from the committed records: a change that bumps a rule's
    RULE_VERSION or the PROTOCOL_VERSION makes them stale, and this fails until they are run again (make
    compare reruns exactly those) or taken out. A refactor that changes no number bumps nothing."""
    summaries = sorted((versions.REPO / "results/runs/standard").glob("**/summary.json"))
    if not summaries:
        pytest.skip("no committed records of the standard grid")
    # on the default data too, where this clone has made it (CI has not: the versions alone there)
    made = all((compare.DEFAULT_DATA / f"{split}.h5").exists() for split in ("train", "val", "test"))
    fingerprint = compare.current_data([])[0] if made else None
    stale = {str(p.relative_to(versions.REPO)): why for p in summaries if (why := versions.record_stale(p, fingerprint))}
    assert not stale, f"{len(stale)} of {len(summaries)} committed records are stale: {dict(list(stale.items())[:5])}"


def test_no_committed_record_holds_an_absolute_path():
    """The committed index and summaries name files relative to the repository (or to the index's folder),
    so that any clone reads them; a path of the machine that ran the grid would be meaningless there."""
    root = versions.REPO / "results/runs/standard"
    files = [root / "index.json", *sorted(root.glob("**/summary.json"))]
    if not files[0].exists():
        pytest.skip("no committed records of the standard grid")

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    absolute = {str(f.relative_to(versions.REPO)): s for f in files for s in strings(json.loads(f.read_text()))
                if s.startswith("/") and "/" in s[1:]}
    assert not absolute, f"{len(absolute)} records hold absolute paths: {dict(list(absolute.items())[:3])}"
