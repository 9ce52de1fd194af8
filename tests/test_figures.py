"""The figures of make compare, drawn from scripted run logs: each is a valid PNG of non-trivial size, and
the decision panels find what each rule logged (and leave out what never changed)."""
import json

from common import figures

TASKS = ["binary", "mature", "gory"]
PNG = b"\x89PNG\r\n\x1a\n"


def scripted_run(folder, train_lines, summary_decisions=None, seeds=(0, 1)):
    """{seed: summary} of a fake strategy: a metrics.jsonl with a start line, train lines and val lines."""
    out = {}
    for seed in seeds:
        run = folder / f"seed{seed}"
        run.mkdir(parents=True)
        records = [{"event": "start", "tasks": TASKS}]
        records += [{"event": "train", "step": s, **line} for s, line in train_lines]
        records += [{"event": "val", "step": 10 * k, "per_task": {t: {"ap": 0.2 * k + 0.01 * i}
                                                                   for i, t in enumerate(TASKS)}}
                    for k in (1, 2, 3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        summary = {"_path": str(run / "summary.json"), "decisions": summary_decisions or {},
                   "test": {"per_task": {t: {"ap": 0.5 + 0.1 * seed + 0.05 * i} for i, t in enumerate(TASKS)}}}
        out[seed] = summary
    return out


def assert_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > min_bytes, (path, len(data))


def test_every_figure_is_a_real_png_and_finds_each_rules_decisions(tmp_path):
    equal = scripted_run(tmp_path / "all_at_once", [(s, {"weights": [1.0, 1.0, 1.0]}) for s in range(0, 30, 5)])
    gradnorm = scripted_run(tmp_path / "gradnorm", [(s, {"weights": [1.0 + s / 30, 1.0, 1.0 - s / 60]})
                                                    for s in range(0, 30, 5)])
    stop_go = scripted_run(tmp_path / "stop_and_go", [(s, {"states": {"binary": "go", "mature": "stop" if s > 10 else "go",
                                                                       "gory": "go"}}) for s in range(0, 30, 5)])
    affinity = {a: {b: (1.0 if a == b else -0.5) for b in TASKS} for a in TASKS}
    tag = scripted_run(tmp_path / "task_grouping", [], summary_decisions={"affinity": affinity})
    by_label = {"all_at_once": equal, "gradnorm": gradnorm, "stop_and_go": stop_go, "task_grouping": tag}

    kinds = {lab: [(title, kind) for title, kind, _ in figures.decision_panels(runs[0], TASKS)]
             for lab, runs in by_label.items()}
    assert kinds["all_at_once"] == []                       # equal weights never change: nothing to draw
    assert kinds["gradnorm"] == [("weights", "lines")]
    assert kinds["stop_and_go"] == [("states (dark = trained)", "timeline")]
    assert kinds["task_grouping"] == [("affinity Z[i->j]", "heatmap")]

    first_seed = {lab: runs[0] for lab, runs in by_label.items()}
    assert_png(figures.ap_bars(by_label, TASKS, tmp_path / "figs" / "ap.png"))
    assert_png(figures.learning_curves(first_seed, TASKS, tmp_path / "figs" / "curves.png"))
    assert_png(figures.decisions(first_seed, TASKS, tmp_path / "figs" / "decisions.png"))


def test_no_decisions_figure_when_no_rule_decided_anything(tmp_path):
    equal = scripted_run(tmp_path / "all_at_once", [(s, {"weights": [1.0, 1.0, 1.0]}) for s in range(0, 30, 5)])
    assert figures.decisions({"all_at_once": equal[0]}, TASKS, tmp_path / "d.png") is None
    assert not (tmp_path / "d.png").exists()


def test_the_logs_of_a_merged_run_are_the_models_its_summary_names(tmp_path):
    """task_grouping's folder also holds its affinity and brute-force runs: only the models the merged
    summary names (decisions.models) are its curves."""
    from common.figures import run_logs
    for name in ("binary+gory", "mature", "affinity", "brute_2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("{}\n")
    summary = {"_path": str(tmp_path / "summary.json"),
               "decisions": {"models": {"binary+gory": ["binary", "gory"], "mature": ["mature"]}}}
    assert run_logs(summary) == [tmp_path / "binary+gory" / "metrics.jsonl", tmp_path / "mature" / "metrics.jsonl"]
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # a run of one model: its own log
    assert run_logs(summary) == [tmp_path / "metrics.jsonl"]
