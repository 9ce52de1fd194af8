"""make compare: statistics, and a tiny end-to-end comparison over two strategies and two seeds."""
import csv
import json
import math

import pytest

from common import compare


def test_paired_t_test_matches_closed_form_for_two_degrees_of_freedom():
    t, p = compare.paired_t_test([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert t == pytest.approx(2 / (1 / math.sqrt(3)))
    assert p == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)  # Student t, df = 2


def test_paired_t_test_large_df_near_normal():
    import numpy as np
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    t, p = compare.paired_t_test(a + 0.1, a - 0.1 + rng.normal(scale=1.0, size=200))
    z = abs(t)
    normal_p = math.erfc(z / math.sqrt(2))
    assert p == pytest.approx(normal_p, abs=0.01)


def test_discovery_finds_every_strategy_script():
    names = compare.discover()
    assert {"all_at_once", "stop_and_go", "pcgrad", "single_task"} <= set(names)


def test_tiny_compare_end_to_end_and_reuse(tiny_data, tmp_path, capsys):
    argv = ["--only", "all_at_once,round_robin", "--seeds", "2", "--out", str(tmp_path), "--data", str(tiny_data),
            "--extra", "--model-size tiny --epochs 1 --batch-size 8"]
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
    mean = sum(s["test"]["mean"]["f1_pos"] for s in rr) / 2
    assert f"{mean:.3f} ±" in md.split("| round_robin")[1].split("\n")[0]

    # rerunning reuses the finished runs: no script is started again
    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "runs" / "quick").glob("*/seed*/summary.json")}
    capsys.readouterr()
    compare.main(argv)
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes


def test_failed_run_is_shown_and_others_continue(tiny_data, tmp_path):
    # --lr -1 makes Adam raise at construction: every run fails, the compare still writes its table
    argv = ["--only", "round_robin", "--seeds", "1", "--out", str(tmp_path), "--data", str(tiny_data),
            "--extra", "--model-size tiny --epochs 1 --lr -1"]
    compare.main(argv)
    md = (tmp_path / "compare.md").read_text()
    assert "failed" in md and "learning rate" in md.lower()


def test_pretraining_section(tiny_data, tmp_path):
    argv = ["--only", "all_at_once", "--seeds", "1", "--out", str(tmp_path), "--data", str(tiny_data),
            "--pretraining", "--pretrain-schedulers", "round_robin",
            "--extra", "--model-size tiny --epochs 1 --batch-size 8"]
    compare.main(argv)
    md = (tmp_path / "compare.md").read_text()
    section = md.split("## Pretraining")[1]
    assert "| none" in section and "| round_robin" in section
    ft = json.loads((tmp_path / "runs/quick/all_at_once/from_round_robin_seed0/summary.json").read_text())
    pre = tmp_path / "runs/quick/round_robin_pretrain/pre_seed0/best.pt"
    assert pre.exists()
    start = json.loads((tmp_path / "runs/quick/all_at_once/from_round_robin_seed0/metrics.jsonl").read_text().splitlines()[0])
    assert start["args"]["init"] == str(pre)
    assert f"{ft['test']['mean']['f1_pos']:.3f}" in section.split("| round_robin")[1].split("\n")[0]


def test_delta_m_undefined_for_a_zero_reference_is_left_out(tmp_path):
    def summary(strategy, f1s):
        per = {t: {"f1_pos": v, "f1_macro": v, "accuracy": v, "ap": 0.5 + v} for t, v in f1s.items()}
        s = {"strategy": strategy, "seed": 0, "tasks": list(f1s), "seconds_per_step": 1.0, "seconds_per_epoch": 2.0,
             "test": {"per_task": per, "mean": {"f1_pos": sum(f1s.values()) / 2, "f1_macro": 0.5, "ap": 0.5}},
             "decisions": {}}
        path = tmp_path / f"{strategy}.json"
        path.write_text(json.dumps(s))
        return {"status": "ok", "summary": str(path)}
    index = {"single_task seed0": summary("single_task", {"binary": 0.5, "gory": 0.0}),
             "all_at_once seed0": summary("all_at_once", {"binary": 0.6, "gory": 0.2})}
    rows, _, csv_rows = compare.build_tables(index, [("single_task", [], 0), ("all_at_once", [], 0)], ["binary", "gory"])
    row = next(r for r in csv_rows if r["strategy"] == "all_at_once")
    assert row["delta_m"] is None                      # gory's reference is 0: not a number, not an error
    # on AP it is defined: (100 / 2) * ((1.1 - 1.0) / 1.0 + (0.7 - 0.5) / 0.5) = 25
    assert row["delta_m_ap"] == pytest.approx(25.0)
    table_row = next(r for r in rows if r[0] == "all_at_once")
    assert "25.0" in table_row


def test_compact_decisions_show_orders_and_groups():
    from common.compare import compact
    assert compact(["gory", "sarcasm", "binary"]) == "gor>sar>bin"
    assert compact([["binary"], ["mature", "slapstick"]]) == "[bin] [mat sla]"
    assert compact({"binary": 0.123, "gory": 1}) == "bin 0.12 gor 1"
