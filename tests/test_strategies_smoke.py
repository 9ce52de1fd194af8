"""Every strategy script runs a few steps on tiny data, then resumes from its checkpoint and finishes.
The scripts run in this process (runpy, as `python strategies/x.py` would) to spare the start-up cost.

The golden check: the finished run's numbers are pinned in tests/golden.json with the versions that made
them (common/versions.py). A change that moves any of them must bump the version of the rule (or of the
protocol) it changed, so that make compare never reuses a record the code no longer reproduces; then
refresh the pins with UPDATE_GOLDEN=1 python -m pytest tests/test_strategies_smoke.py. A refactor (issue 27)
leaves every pin as it is."""
import json
import math
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # minutes: left out by -m "not slow"

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (REPO / "strategies").glob("*.py") if not p.stem.startswith("_"))
GOLDEN = REPO / "tests" / "golden.json"
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
    check_test_scores(summary, summaries[-1], tiny_data)
    check_golden(script, summary)


def check_test_scores(summary, path, tiny_data):
    """The summary's test_scores point at each task's test probabilities (a merged summary: at its models'
    files), the ones its test AP was computed from; the verdict's bootstrap reads them."""
    from common.compare import test_scores
    from common.data import TASKS, H5Dataset
    from common.stats import weighted_average_precision
    scores = test_scores({**summary, "_path": path}, summary["tasks"])
    assert scores is not None, summary.get("test_scores")
    labels = H5Dataset(tiny_data / "test.h5").labels
    for i, t in enumerate(summary["tasks"]):
        ap = weighted_average_precision(scores[:, i], labels[:, TASKS.index(t)], np.ones(len(labels)))
        assert ap == pytest.approx(summary["test"]["per_task"][t]["ap"], abs=1e-9), t


def test_the_template_trains_what_the_rules_scripts_train(tiny_data, tmp_path, capsys, monkeypatch):
    """strategies/_template.py (the script to copy) takes every --weighting and --aggregator and writes out the
    loop that the rules' scripts share: with pcgrad and uncertainty it ends where pcgrad.py does."""
    flags = ("--max-steps", "4", "--weighting", "uncertainty")
    run("_template", tiny_data, tmp_path, capsys, monkeypatch, *flags, "--aggregator", "pcgrad")
    run("pcgrad", tiny_data, tmp_path, capsys, monkeypatch, *flags)
    ours, theirs = (json.loads((tmp_path / name / "seed0" / "summary.json").read_text()) for name in ("_template", "pcgrad"))
    assert ours["steps"] == theirs["steps"] == 4
    assert ours["test"] == theirs["test"] and ours["decisions"] == theirs["decisions"]


def golden_numbers(summary):
    """The pinned numbers of a run: continuous ones, so that any change of a rule moves them."""
    return {"steps": summary["steps"], "steps_to_best": summary["steps_to_best"],
            "val_loss": summary["val"]["mean"]["loss"], "test_loss": summary["test"]["mean"]["loss"],
            "test_ap": summary["test"]["mean"]["ap"]}


def check_golden(script, summary):
    from common import gradagg
    pins = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    # the Gram matrix's summation order differs between the C++ kernel and the PyTorch fallback, and a
    # sensitive rule (sdmgrad: 20 momentum steps at lr 10) moves by more than 1e-6 in 6 steps: the pins are
    # made with the kernel `make build` builds, and compared only where that kernel is in use
    now = {"versions": summary["versions"], "numbers": golden_numbers(summary), "gram_backend": gradagg.BACKEND}
    if os.environ.get("UPDATE_GOLDEN"):
        pins[script] = now
        GOLDEN.write_text(json.dumps(dict(sorted(pins.items())), indent=1) + "\n")
        return
    assert script in pins, f"no golden numbers for {script}: run with UPDATE_GOLDEN=1 once"
    pinned = pins[script]
    same_kernel = pinned.get("gram_backend") == now["gram_backend"]
    moved = {k: (v, now["numbers"][k]) for k, v in pinned["numbers"].items()
             if not math.isclose(v, now["numbers"][k], rel_tol=1e-6, abs_tol=1e-9)} if same_kernel else {}
    if moved and pinned["versions"] == now["versions"]:
        raise AssertionError(f"{script}: results changed without a version bump {moved}; if the change is meant, bump "
                             "RULE_VERSION / the rule's version / PROTOCOL_VERSION (common/versions.py), then "
                             "UPDATE_GOLDEN=1")
    assert pinned["versions"] == now["versions"], (
        f"{script}: versions {pinned['versions']} -> {now['versions']}: refresh the pins with UPDATE_GOLDEN=1")
    if not same_kernel:
        pytest.skip(f"golden numbers of {script} were made with the {pinned.get('gram_backend')} Gram kernel, "
                    f"this run has {now['gram_backend']} (make build)")
