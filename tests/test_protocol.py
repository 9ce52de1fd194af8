"""The comparison protocol inside a run: early stopping, the selection metric, val-chosen thresholds on test."""
import json
import subprocess
import sys

import pytest

from common.data import TASKS
from tests.conftest import REPO


def tiny_run(tiny_data, tmp_path, *flags):
    from common.arguments import build_parser
    from common.train import Run
    args = build_parser().parse_args(["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny",
                                      "--quiet", *flags])
    return Run(args, strategy="protocol_test")


def scripted(run, scores):
    """Make run.evaluate return these selection scores one after the other (the real metrics' shape)."""
    real = run.evaluate(run.val_set)
    it = iter(scores)

    def fake(dataset, model=None, modalities="current", **options):
        m = json.loads(json.dumps(real))
        m["mean"]["selection"] = next(it)
        return m
    run.evaluate = fake


def test_early_stopping_stops_at_the_right_evaluation(tiny_data, tmp_path):
    run = tiny_run(tiny_data, tmp_path, "--early-stop-patience", "3", "--epochs", "50")
    run.start()
    # evaluations 1..7: new bests at 1, 2 and 4; 5, 6, 7 bring none (0.5 equals the best: not a new best)
    scripted(run, [0.1, 0.3, 0.2, 0.5, 0.4, 0.5, 0.45, 0.9])
    budget = run.total_steps
    stopped = []
    for k in range(1, 8):
        run.progress["step"] = 10 * k
        run.validate()
        stopped.append(run.total_steps == run.step_count)
    assert stopped == [False] * 6 + [True]
    assert run.progress["best_step"] == 40 and run.total_steps == 70 < budget
    del run.evaluate  # the real metrics for the summary
    summary = run.finish()
    assert summary["stopped_early"] and summary["steps_to_best"] == 40 and summary["budget_steps"] == budget
    vals = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in vals if r["event"] == "val"]
    assert [r["evals_without_best"] for r in vals] == [0, 0, 1, 0, 1, 2, 3]
    assert [r["early_stop"] for r in vals] == [False] * 6 + [True]


def test_holding_early_stopping_restarts_its_count(tiny_data, tmp_path):
    run = tiny_run(tiny_data, tmp_path, "--early-stop-patience", "2", "--epochs", "50")
    run.start()
    scripted(run, [0.5, 0.4, 0.4, 0.4, 0.4])
    for k, hold in enumerate([False, True, True, False, False], start=1):
        run.set_hold_early_stop(hold)  # e.g. a curriculum still bringing tasks in
        run.progress["step"] = 10 * k
        run.validate()
    # the count restarts while held (evals 2, 3) and reaches 2 at eval 5
    assert run.progress["stopped_at"] == 50


def test_no_early_stopping_by_default_and_loss_selection(tiny_data, tmp_path):
    run = tiny_run(tiny_data, tmp_path, "--epochs", "50", "--select-metric", "loss")
    run.start()
    for k in range(1, 6):
        run.progress["step"] = 10 * k
        metrics = run.validate()
        assert metrics["mean"]["selection"] == pytest.approx(-metrics["mean"]["loss"])  # higher is better
        assert metrics["per_task"]["gory"]["score"] == metrics["per_task"]["gory"]["ap"]  # --metric ap default
    assert run.progress["stopped_at"] == 0 and run.total_steps == 50 * run.steps_per_epoch


def test_early_stopped_run_resumes_exactly_and_test_f1_uses_val_thresholds(tiny_data, tmp_path):
    script = [sys.executable, str(REPO / "strategies" / "round_robin.py"), "--data", str(tiny_data),
              "--model-size", "tiny", "--epochs", "8", "--batch-size", "8", "--eval-every", "2",
              "--early-stop-patience", "2", "--quiet", "--threads", "1"]
    subprocess.run(script + ["--out", str(tmp_path / "a")], check=True, capture_output=True, cwd=REPO)
    a = json.loads((tmp_path / "a/round_robin/seed0/summary.json").read_text())
    assert a["stopped_early"] and a["steps"] < a["budget_steps"] == 8 * 8
    # crash after the stopping step's checkpoint, before the summary: the resumed run must not train on
    crash = subprocess.run(script + ["--out", str(tmp_path / "b"), "--crash-after-step", str(a["steps"])],
                           capture_output=True, cwd=REPO)
    assert crash.returncode == 3
    subprocess.run(script + ["--out", str(tmp_path / "b"), "--resume"], check=True, capture_output=True, cwd=REPO)
    b = json.loads((tmp_path / "b/round_robin/seed0/summary.json").read_text())
    assert (b["steps"], b["steps_to_best"], b["test"]["mean"]) == (a["steps"], a["steps_to_best"], a["test"]["mean"])
    for t, thr in a["thresholds"].items():
        assert a["val"]["per_task"][t]["threshold"] == thr == a["test"]["per_task"][t]["threshold"]


def run_script(script, tiny_data, out, monkeypatch, capsys, *flags):
    import runpy
    argv = [f"{script}.py", "--data", str(tiny_data), "--out", str(out), "--model-size", "tiny", "--epochs", "1",
            "--batch-size", "4", "--eval-every", "2", "--quiet", "--early-stop-patience", "1", *flags]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "strategies" / f"{script}.py"), run_name="__main__")
    capsys.readouterr()
    (metrics,) = out.glob("*/seed0/metrics.jsonl")  # the run folder may carry a suffix (curriculum_easy)
    return [json.loads(x) for x in metrics.read_text().splitlines()]


@pytest.mark.parametrize("script,flags", [
    ("curriculum", ["--probe-steps", "1", "--entry-every", "3"]),   # tasks enter at steps 0, 3, 6, 9, 12
    ("sequential", ["--max-task-epochs", "0.15"]),                  # phases of at most 2 steps
])
def test_schedules_hold_early_stopping_until_every_task_is_in(script, flags, tiny_data, tmp_path, monkeypatch, capsys):
    records = run_script(script, tiny_data, tmp_path, monkeypatch, capsys, *flags)
    vals = [r for r in records if r["event"] == "val"]
    if script == "curriculum":
        held = [r for r in vals if not all(r["entered"])]
    else:
        held = [r for r in vals if r["task"] != TASKS[-1]]  # the phases follow the --tasks order
    assert held, "the schedule should still be bringing tasks in at some evaluation"
    # while held, patience 1 never counts an evaluation without a new best, so nothing stops early
    assert all(r["evals_without_best"] == 0 and not r["early_stop"] for r in held)
