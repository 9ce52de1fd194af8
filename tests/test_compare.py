"""make compare: statistics, and a tiny end-to-end comparison over two strategies and two seeds."""
import csv
import json
import math
import re

import pytest

from common import compare
from common.records import log_path, read_log


# ---------------------------------------------------------------- statistics (scipy), by hand
def test_paired_t_test_matches_closed_form_for_two_degrees_of_freedom():
    from common.stats import paired_tests
    p = paired_tests([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    t = 2 / (1 / math.sqrt(3))  # mean 2, sd 1, n 3
    assert p["t"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)  # Student t, df = 2
    # Wilcoxon, exact: 3 positive differences, W- = 0; of the 2^3 sign patterns only all+ and all- are as
    # extreme: p = 2/8
    assert p["wilcoxon"] == pytest.approx(0.25)


def test_paired_tests_undefined_without_evidence():
    from common.stats import paired_tests
    assert all(math.isnan(v) for v in paired_tests([0.5, 0.6], [0.5, 0.6]).values())
    assert all(math.isnan(v) for v in paired_tests([0.5], [0.4]).values())


def test_holm_matches_a_hand_computed_case():
    from common.stats import holm
    # sorted: 0.01 (x4 = 0.04), 0.03 (x3 = 0.09), 0.04 (x2 = 0.08 -> monotone 0.09), 0.5 (x1 = 0.5);
    # the nan is not part of the family
    adjusted = holm([0.04, 0.01, 0.5, float("nan"), 0.03])
    assert adjusted[:3] == pytest.approx([0.09, 0.04, 0.5]) and math.isnan(adjusted[3])
    assert adjusted[4] == pytest.approx(0.09)
    assert holm([0.4, 0.6]) == pytest.approx([0.8, 0.8])  # capped monotone: min(1, 2*0.4), max(0.8, 0.6)


def test_interval_and_ranks_by_hand():
    from common.stats import mean_interval, mean_ranks
    m, sd, half = mean_interval([1.0, 2.0, 3.0])
    assert (m, sd) == pytest.approx((2.0, 1.0)) and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    ranks = mean_ranks({"a": {"x": 0.9, "y": 0.1}, "b": {"x": 0.5, "y": 0.5}, "c": {"x": 0.5, "y": 0.9}})
    assert ranks == pytest.approx({"a": 2.0, "b": 2.25, "c": 1.75})  # x: a 1, b/c 2.5; y: c 1, b 2, a 3


def test_discovery_finds_every_strategy_script():
    names = compare.discover()
    assert {"all_at_once", "stop_and_go", "pcgrad", "single_task"} <= set(names)


def test_the_baseline_and_the_reference_are_declared_by_their_scripts(monkeypatch):
    assert (compare.BASELINE, compare.REFERENCE) == ("all_at_once", "single_task")   # COMPARE_ROLE in each
    assert compare.planned_rows(["pcgrad", "single_task"])[0][0] == "single_task"    # the reference runs first
    monkeypatch.setattr(compare, "script_constant", lambda script, name: "baseline")
    with pytest.raises(SystemExit, match="one must"):                                 # two baselines: refused
        compare.declared_row("baseline")


def test_tiny_compare_end_to_end_and_reuse(tiny_data, tmp_path, capsys):
    argv = ["--only", "all_at_once,round_robin", "--seeds", "2", "--jobs", "2", "--out", str(tmp_path),
            "--data", str(tiny_data), "--extra", "--model-size tiny --epochs 1 --batch-size 8"]
    compare.main(argv)
    md = (tmp_path / "compare.md").read_text()
    rows = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert {(r["strategy"], r["seed"]) for r in rows} == {
        ("all_at_once", "0"), ("all_at_once", "1"), ("all_at_once_learned", "0"), ("all_at_once_learned", "1"),
        ("round_robin", "0"), ("round_robin", "1")}
    # the table's numbers are those of the runs' summary.json files
    for r in rows:
        summary = json.loads((tmp_path / "runs" / "quick" / r["strategy"] / f"seed{r['seed']}" / "summary.json").read_text())
        assert float(r["mean_f1_pos"]) == pytest.approx(summary["test"]["mean"]["f1_pos"], abs=1e-12)
        assert float(r["f1_pos_gory"]) == pytest.approx(summary["test"]["per_task"]["gory"]["f1_pos"], abs=1e-12)
    rr = [json.loads((tmp_path / "runs/quick/round_robin" / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
    mean = sum(s["test"]["mean"]["ap"] for s in rr) / 2
    # the main table's row (mean ± std), not the verdict's ("no call: Δ within ±b")
    main_row = next(line for line in md.splitlines() if line.startswith("| round_robin") and re.search(r"\d ± \d", line))
    assert f"{mean:.3f} ±" in main_row
    assert "## Verdict" in md and "minimum detectable effect" in md
    assert "quick profile: a first look" in md.splitlines()[0]
    for png in ("compare_ap.png", "compare_curves.png"):
        assert f"]({png})" in md and (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # rerunning reuses the finished runs: no script is started again, also with another --jobs (threads)
    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "runs" / "quick").glob("*/seed*/summary.json")}
    capsys.readouterr()
    compare.main(argv + ["--jobs", "1"])
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes

    # --plot-only redraws the tables and figures from the runs and trains nothing
    (tmp_path / "compare.md").unlink()
    (tmp_path / "compare_ap.png").unlink()
    logs = {p: p.stat().st_mtime for p in (tmp_path / "runs/quick/logs").iterdir()}
    index = (tmp_path / "runs/quick/index.json").read_bytes()
    compare.main(argv + ["--plot-only"])
    assert (tmp_path / "compare.md").read_text() == md and (tmp_path / "compare_ap.png").exists()
    # the index it rewrites is byte for byte the one before, ending in a newline (no diff on committed records)
    assert (tmp_path / "runs/quick/index.json").read_bytes() == index and index.endswith(b"}\n")
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs/quick/logs").iterdir()} == logs


def test_tuning_picks_the_best_validation_config_and_runs_it_over_the_seeds(tiny_data, tmp_path):
    argv = ["--only", "round_robin", "--seeds", "1", "--tune", "--lrs", "1e-4,3e-3", "--jobs", "2", "--out", str(tmp_path),
            "--data", str(tiny_data), "--extra", "--model-size tiny --epochs 1 --batch-size 8"]
    compare.main(argv)
    tune = {lr: json.loads((tmp_path / f"runs/quick/tune/round_robin/lr{lr}/round_robin/seed100/summary.json").read_text())
            for lr in ("0.0001", "0.003")}
    best = max(tune, key=lambda lr: tune[lr]["val"]["mean"]["ap"])
    final = json.loads((tmp_path / "runs/quick/round_robin/seed0/summary.json").read_text())
    assert final["lr"] == float(best) and final["seed"] == 0
    md = (tmp_path / "compare.md").read_text()
    assert f"| round_robin | lr {best} " in md and "## Tuning" in md
    assert f"{tune[best]['val']['mean']['ap']:.3f}*" in md.split("## Tuning")[1]
    with pytest.raises(SystemExit, match="evaluation seed"):
        compare.main(argv + ["--tune-seeds", "0"])


def test_tuning_choice_reads_validation_only(tmp_path):
    # the tuning runs' summaries hold no test metrics at all: the choice must not need them
    index, grids = {}, {"all_at_once": [["--lr", "0.001"], ["--lr", "0.003"], ["--lr", "0.01"]]}
    for (config, val_ap) in zip(grids["all_at_once"], (0.4, 0.7, None)):
        key = compare.run_key("tune", "all_at_once", [], config, 100)
        if val_ap is None:
            index[key] = {"status": "failed", "error": "boom"}
            continue
        path = tmp_path / f"{compare.config_tag(config)}.json"
        path.write_text(json.dumps({"strategy": "all_at_once", "val": {"mean": {"ap": val_ap, "loss": 1 - val_ap}}}))
        index[key] = {"status": "ok", "summary": str(path)}
    config, scores = compare.choose_tuned(index, "all_at_once", [], grids, [100], "ap")
    assert config == ["--lr", "0.003"] and scores == {"lr0.001": 0.4, "lr0.003": 0.7, "lr0.01": None}
    config, _ = compare.choose_tuned(index, "all_at_once", [], grids, [100], "loss")  # minus the loss: same order
    assert config == ["--lr", "0.003"]
    assert compare.validation_view({"val": 1, "test": 2}) == {"val": 1}


def test_failed_run_is_shown_and_others_continue(tiny_data, tmp_path):
    # --lr -1 makes Adam raise at construction: every run fails, the compare still writes its table
    argv = ["--only", "round_robin", "--seeds", "1", "--out", str(tmp_path), "--data", str(tiny_data),
            "--extra", "--model-size tiny --epochs 1 --lr -1"]
    compare.main(argv)
    md = (tmp_path / "compare.md").read_text()
    assert "failed" in md and "learning rate" in md.lower()
    # the index keeps the command to rerun it, without this machine's interpreter or repository paths
    (index,) = tmp_path.glob("runs/*/index.json")
    failed = [e for k, e in json.loads(index.read_text()).items() if k != "chosen" and e["status"] == "failed"]
    assert failed and all(e["cmd"][:2] == ["python", "strategies/round_robin.py"] for e in failed)


def test_pretraining_section(tiny_data, tmp_path):
    argv = ["--only", "all_at_once", "--seeds", "1", "--jobs", "2", "--out", str(tmp_path), "--data", str(tiny_data),
            "--pretraining", "--pretrain-schedulers", "round_robin",
            "--extra", "--model-size tiny --epochs 1 --batch-size 8"]
    compare.main(argv)
    md = (tmp_path / "compare.md").read_text()
    section = md.split("## Pretraining")[1]
    assert "| none" in section and "| round_robin" in section
    ft = json.loads((tmp_path / "runs/quick/all_at_once/from_round_robin_seed0/summary.json").read_text())
    pre = tmp_path / "runs/quick/round_robin_pretrain/pre_seed0/best.pt"
    assert pre.exists()
    start = read_log(log_path(tmp_path / "runs/quick/all_at_once/from_round_robin_seed0"))[0]
    assert start["args"]["init"] == str(pre)
    row = section.split("| round_robin")[1].split("\n")[0]
    numbers = [float(x) for x in re.findall(r"-?\d+\.\d+", row)]   # tabulate drops trailing zeros
    assert any(abs(x - ft["test"]["mean"]["f1_pos"]) < 5e-4 for x in numbers), row


def fake_summary(strategy, aps, f1s, seed=0):
    per = {t: {"f1_pos": f1s[t], "f1_pos_tuned": f1s[t], "f1_macro": 0.5, "accuracy": 0.5, "ap": aps[t],
               "collapsed": f1s[t] == 0} for t in aps}
    mean = {m: sum(v[m] for v in per.values()) / len(per) for m in ("f1_pos", "f1_pos_tuned", "f1_macro", "ap")}
    return {"strategy": strategy, "seed": seed, "tasks": list(aps), "seconds_per_step": 1.0, "seconds_per_epoch": 2.0,
            "steps": 10, "train_seconds": 10.0, "val": {"per_task": per, "mean": mean},
            "test": {"per_task": per, "mean": mean}, "decisions": {}}


def test_delta_m_undefined_for_a_zero_reference_is_left_out():
    by_label = {"single_task": {0: fake_summary("single_task", {"binary": 1.0, "gory": 0.5}, {"binary": 0.5, "gory": 0.0})},
                "all_at_once": {0: fake_summary("all_at_once", {"binary": 1.1, "gory": 0.7}, {"binary": 0.6, "gory": 0.2})}}
    tables, csv_rows = compare.build_tables(by_label, ["binary", "gory"])
    row = next(r for r in csv_rows if r["strategy"] == "all_at_once")
    assert row["delta_m_f1_tuned"] is None             # gory's reference is 0: not a number, not an error
    # on AP it is defined: (100 / 2) * ((1.1 - 1.0) / 1.0 + (0.7 - 0.5) / 0.5) = 25
    assert row["delta_m_ap"] == pytest.approx(25.0)
    assert "25.0" in next(r for r in tables["main"] if r[0] == "all_at_once")
    # collapse count: single_task's gory predicts one class (F1+ 0 here) on its one seed
    assert "gor 1" in next(r for r in tables["main"] if r[0] == "single_task")


def test_significance_is_holm_corrected_over_the_strategies_compared():
    tasks = ["binary"]
    base = {s: fake_summary("all_at_once", {"binary": 0.5 + 0.01 * s}, {"binary": 0.5}, s) for s in range(3)}
    better = {s: fake_summary("better", {"binary": 0.6 + 0.01 * s + 0.001 * s * s}, {"binary": 0.5}, s) for s in range(3)}
    same = {s: fake_summary("same", {"binary": 0.5 + 0.01 * s + (0.002 if s == 1 else -0.001)}, {"binary": 0.5}, s)
            for s in range(3)}
    tables, _ = compare.build_tables({"all_at_once": base, "better": better, "same": same}, tasks)
    from common.stats import holm, paired_tests
    p_better = paired_tests([0.6, 0.611, 0.624], [0.5, 0.51, 0.52])["t"]
    p_same = paired_tests([0.499, 0.512, 0.519], [0.5, 0.51, 0.52])["t"]
    expected = holm([p_better, p_same])
    row = next(r for r in tables["significance"] if r[0] == "better")
    assert row[1] == "+0.102" and row[2] == "+++"
    assert row[3] == f"{p_better:.3f}" and row[4] == f"{expected[0]:.3f}"
    # Wilcoxon: better's 3 positive differences give p = 2/8; same's (W+ = W- = 3) give p = 1;
    # Holm over the two: 2 x 0.25 = 0.5, and max(0.5, 1 x 1.0) = 1.0
    assert (row[5], row[6]) == ("0.250", "0.500")
    assert next(r for r in tables["significance"] if r[0] == "same")[6] == "1.000"


def test_compact_decisions_show_orders_and_groups():
    from common.compare import compact
    assert compact(["gory", "sarcasm", "binary"]) == "gor>sar>bin"
    assert compact([["binary"], ["mature", "slapstick"]]) == "[bin] [mat sla]"
    assert compact({"binary": 0.123, "gory": 1}) == "bin 0.12 gor 1"


def test_models_add_a_model_column(tiny_data, tmp_path):
    """--models runs the comparison once per trunk (runs/<profile>/<model>/) and writes one table whose
    rows start with their model; each row's numbers are those of that model's runs."""
    argv = ["--only", "round_robin", "--seeds", "1", "--models", "hca,late_fusion", "--jobs", "2", "--out", str(tmp_path),
            "--data", str(tiny_data), "--extra", "--model-size tiny --epochs 1 --batch-size 8"]
    compare.main(argv)
    md = (tmp_path / "compare.md").read_text()
    rows = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert {(r["model"], r["strategy"]) for r in rows} == {("hca", "round_robin"), ("late_fusion", "round_robin")}
    assert "| model " in md and "models (--trunk): hca, late_fusion" in md
    for r in rows:
        summary = json.loads((tmp_path / "runs/quick" / r["model"] / "round_robin/seed0/summary.json").read_text())
        assert summary["trunk"] == r["model"]
        assert float(r["mean_ap"]) == pytest.approx(summary["test"]["mean"]["ap"], abs=1e-12)
        line = next(x for x in md.splitlines() if x.startswith(f"| {r['model']} ") and "| round_robin " in x)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[4].split()[0]) == pytest.approx(summary["test"]["mean"]["ap"], abs=5e-4)  # mean AP
    assert (tmp_path / "compare_late_fusion_ap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_primary_family_names_planned_rows_and_runs_first():
    """Every label of PRIMARY (and the baseline and reference) is exactly one planned row, so that make compare
    can finish the rows of the verdict before the exploratory ones; a misspelt label would silently leave
    its row for later."""
    from common.compare import BASELINE, PRIMARY, REFERENCE, discover, planned_rows, primary_rows, row_label
    rows = planned_rows(discover())
    first = primary_rows(rows)
    labels = [row_label(*r) for r in first]
    assert sorted(labels) == sorted(set(PRIMARY) | {BASELINE, REFERENCE})
    assert row_label("curriculum", ["--order", "easy"]) == "curriculum_easy"
    assert ("pcgrad", ["--grad-space", "representation"]) in rows and row_label(
        "pcgrad", ["--grad-space", "representation"]) not in labels
    assert first == [r for r in rows if r in first]   # the planned order kept (the reference first)


def test_a_script_declares_its_tuning_grid():
    """--grid full: the learning rates times the values of the TUNE_GRID a script declares (no list of names
    in compare.py); a script without one tunes the learning rate only."""
    from common.compare import grid_for
    from common.versions import script_constant
    assert script_constant("gradnorm", "TUNE_GRID") == ("--gradnorm-alpha", ["1.5", "0.5"])
    assert grid_for("gradnorm", "tiny", "full") == [["--lr", lr, "--gradnorm-alpha", a]
                                                    for lr in ("0.0003", "0.001", "0.003") for a in ("1.5", "0.5")]
    assert grid_for("gradnorm", "tiny", "lr") == [["--lr", lr] for lr in ("0.0003", "0.001", "0.003")]
    assert script_constant("pcgrad", "TUNE_GRID") is None
    assert grid_for("pcgrad", "tiny", "full") == [["--lr", lr] for lr in ("0.0003", "0.001", "0.003")]


def test_verdict_rows_call_what_holm_allows_and_bound_what_it_does_not():
    """verdict_tables on scripted verdict() rows: a called row says its direction and whether both halves
    of the seeds agree; a primary row not called says the largest |Δ| its interval allows (the larger of
    its bounds' magnitudes); an exploratory row is never called; primary rows come first, by Δ."""
    def row(diff, low, high, called, halves, family="primary"):
        return {"family": family, "seeds": 10, "diff": diff, "low": low, "high": high, "p": 0.01, "p_holm": 0.02,
                "poi": (0.5, 0.4, 0.6), "halves": halves, "called": called,
                "replicated": called and halves[0] * halves[1] > 0, "per_task": [(diff, low, high)] * 2}
    result = {"rows": {"worse_rep": row(-0.03, -0.04, -0.02, True, (-0.03, -0.03)),
                       "better_split": row(0.02, 0.01, 0.03, True, (0.04, -0.001)),
                       "tight": row(0.001, -0.002, 0.003, False, (0.0, 0.002)),
                       "wide": row(-0.004, -0.021, 0.013, False, (0.0, -0.008)),
                       "explo": row(0.05, 0.04, 0.06, False, (0.05, 0.05), family="exploratory"),
                       "partial": row(-0.01, -0.02, 0.0, False, (-0.01, float("nan")), family="exploratory")}}
    main, per_task_rows = compare.verdict_tables(result, ["a", "b"])
    calls = {r[0]: r[-1] for r in main}
    assert calls == {"worse_rep": "worse, replicated", "better_split": "better, not replicated",
                     "tight": "no call: Δ within ±0.003", "wide": "no call: Δ within ±0.021", "explo": "exploratory",
                     "partial": "exploratory"}
    assert [r[0] for r in main] == ["better_split", "tight", "wide", "worse_rep", "explo", "partial"]
    halves = {r[0]: r[-2] for r in main}
    assert halves["better_split"] == "+0.040 / -0.001"
    assert halves["partial"] == "-0.010 / -"  # seeds 5-9 not run yet: no "+nan"
    assert per_task_rows[0] == ["better_split", "+0.020 [+0.010, +0.030]", "+0.020 [+0.010, +0.030]"]
    assert not any("|" in cell for r in main for cell in map(str, r))  # a "|" would split a markdown cell


def test_the_cost_line_states_only_what_was_measured():
    # the summed run time and CPU of every finished run; no parallelism claimed (the runs of several sessions
    # may have run with different --jobs, and --plot-only knows none of them)
    info = {"title": "t", "profile": "p", "model_size": "tiny", "data": "d", "budget": "b", "seeds": [0, 1],
            "tuning": "none", "select_metric": "ap",
            "cost": {"runs": 4, "seconds": 7200, "cpu_seconds": 5400, "planned": 6, "planned_done": 4}}
    text = compare.header_text(info)
    assert "- measured cost: 4 finished runs (tuning included), 2.00 h of run time" in text
    assert "1.50 h of CPU" in text and "at once" not in text
    assert "unfinished grid: 4 of 6 planned runs finished" in text
    assert "primary family" not in text  # one family: no split
    index = {"a": {"status": "ok", "seconds": 3600, "cpu_seconds": 1800}, "b": {"status": "failed", "seconds": 9},
             "c": {"status": "ok", "seconds": 1800, "cpu_seconds": 900}}
    info["cost"]["families"] = {"primary family": compare.family_cost(index, ["a", "c"]),
                                "exploratory rows": compare.family_cost(index, ["b", "d"])}
    text = compare.header_text(info)
    assert "  - primary family: 2 of 2 planned runs finished (complete), 1.50 h of run time and 0.75 h of CPU" in text
    assert "  - exploratory rows: 0 of 2 planned runs finished, 1 failed, 0.00 h of run time" in text
    # every planned run ran, one of them failed: not "unfinished", and the failure is counted
    info["cost"].update(planned_done=5, planned_failed=1)
    index["d"] = {"status": "ok", "seconds": 0, "cpu_seconds": 0}
    info["cost"]["families"]["exploratory rows"] = compare.family_cost(index, ["b", "d"])
    text = compare.header_text(info)
    assert "unfinished grid" not in text
    assert "- every planned run ran: 5 finished, 1 failed" in text
    assert "  - exploratory rows: 1 of 2 planned runs finished, 1 failed (every run ran)," in text


def test_the_eta_leaves_out_the_runs_already_recorded(capsys):
    resuming = compare.Progress(10, jobs=2, recorded=4)
    resuming.update("r", {"status": "running"})  # resumed, its earlier attempt's time unknown: 14 s is a part
    resuming.update("r", {"status": "ok", "seconds": 14.0, "resumed": True, "seconds_partial": True})
    assert resuming.eta() == "ETA after the first finished run" and resuming.done == 1
    resuming.update("s", {"status": "running"})  # resumed, its seconds summed over its attempts: a run's time
    resuming.update("s", {"status": "ok", "seconds": 720.0, "resumed": True})
    assert resuming.eta() == "ETA 0.4 h (720 s per run, 2 at once)"  # 10 - 2 done - 4 recorded: 4 * 720 / 2
    # 10 runs, 4 with finished records: one run of 720 s on 2 jobs leaves 5 to run, 1800 s = 0.5 h
    progress = compare.Progress(10, jobs=2, recorded=4)
    assert progress.eta() == "ETA after the first finished run"
    progress.update("a", {"status": "running"})
    progress.update("a", {"status": "ok", "seconds": 720.0})
    assert progress.eta() == "ETA 0.5 h (720 s per run, 2 at once)"
    left = progress.eta()
    progress.update("b", {"status": "ok"})  # a recorded run reused: the runs left to run stay the same
    assert progress.eta() == left and progress.reused == 1 and progress.done == 2
    progress.recorded = 0  # nothing recorded: the 8 not done all count
    assert progress.eta().startswith("ETA 0.8 h")  # 8 * 720 / 2 = 2880 s
