"""make compare: run every strategy x seeds and write one comparison table.

    python common/compare.py [--profile quick|full] [--seeds 3] [--jobs N] [--data DIR] [--only a,b]

Strategies are discovered as strategies/*.py (a new script appears without edits); VARIANTS adds
the flag settings of a script that deserve their own row. Runs go to results/runs/<profile>/
<strategy>/seed<s>/ and are reused when finished (summary.json present); an interrupted one resumes
(--resume). single_task runs first: it is the reference of Delta_m. A failed run is shown as failed
with its last error line and does not stop the others.

Writes results/compare.md (tables, GitHub markdown), results/compare.csv (one row per run), prints both
tables.
"""
import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.data import TASKS  # noqa: E402
from common.evaluate import delta_m  # noqa: E402
from common.train import DEFAULT_DATA  # noqa: E402

# extra rows for scripts whose flags change the strategy; every script also runs with its defaults
# unless its default is listed here under another name.
VARIANTS = {
    "all_at_once": [[], ["--weights", "learned"]],
    "curriculum": [["--order", "easy"], ["--order", "hard"]],
    "modality_curriculum": [[], ["--mode", "dropout"]],
}
PROFILES = {
    # every strategy x 3 seeds in ~30 minutes on 2 cores (29.6 measured): the tiny model, 2 epochs of the default set
    "quick": ["--data", str(DEFAULT_DATA), "--model-size", "tiny", "--epochs", "2", "--lr", "2e-3", "--eval-every", "45"],
    "full": ["--model-size", "full", "--epochs", "30", "--batch-size", "8", "--lr", "1.5e-5"],
}
BASELINE = "all_at_once"
REFERENCE = "single_task"


def discover(only=None):
    names = sorted(p.stem for p in (REPO / "strategies").glob("*.py") if not p.stem.startswith("_"))
    if only:
        missing = set(only) - set(names)
        if missing:
            raise SystemExit(f"--only: no strategies/{sorted(missing)}.py")
        names = [n for n in names if n in only]
    return names


def planned_runs(names, seeds):
    """(script, variant flags, seed) triples, single_task first."""
    runs = [(n, v, s) for n in names for v in VARIANTS.get(n, [[]]) for s in seeds]
    return sorted(runs, key=lambda r: r[0] != REFERENCE)


def run_key(script, variant, seed):
    return " ".join([script, *variant, f"seed{seed}"])


def execute(script, variant, seed, root, extra, index, log_dir):
    """Run one strategy script (or reuse its finished run); returns its index entry."""
    key = run_key(script, variant, seed)
    entry = index.get(key)
    if entry and entry.get("extra") != extra:
        entry = None  # made with other settings (profile, data): not reusable, and not resumable either
    if entry and entry.get("status") == "ok" and Path(entry["summary"]).exists():
        return entry
    cmd = [sys.executable, str(REPO / "strategies" / f"{script}.py"), "--seed", str(seed), "--out", str(root),
           "--quiet", *extra, *variant]
    if entry:  # started before and not finished: continue it
        cmd.append("--resume")
    log = log_dir / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", key)[-200:] + ".log")
    t0 = time.time()
    index[key] = {"status": "running", "cmd": cmd, "extra": extra}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    # every script ends by printing "summary: <path>" (Run.finish)
    written = [x.split("summary: ", 1)[1] for x in lines if x.startswith("summary: ")]
    if proc.returncode == 0 and written and Path(written[-1]).exists():
        return {"status": "ok", "summary": written[-1], "seconds": time.time() - t0, "log": str(log), "extra": extra}
    error = lines[-1] if lines else f"exit code {proc.returncode}"
    if proc.returncode == 0:
        error = "finished without printing its summary path"
    return {"status": "failed", "error": error[:300], "log": str(log), "cmd": cmd, "extra": extra}


# ---------------------------------------------------------------- statistics
def _betacf(a, b, x):
    """Continued fraction of the regularised incomplete beta function (Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-12:
            break
    return h


def incomplete_beta(a, b, x):
    if x <= 0 or x >= 1:
        return float(x >= 1)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def paired_t_test(a, b):
    """Two-sided paired t-test of a - b. Returns (t, p); p is nan with fewer than 2 pairs or zero spread."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = d.size
    if n < 2:
        return float("nan"), float("nan")
    sd = d.std(ddof=1)
    if sd == 0:
        return (float("nan"), float("nan")) if d.mean() == 0 else (math.copysign(math.inf, d.mean()), 0.0)
    t = d.mean() / (sd / math.sqrt(n))
    df = n - 1
    p = incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return float(t), float(p)


# ---------------------------------------------------------------- tables
def mean_std(values, digits=3):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def compact(value, digits=2):
    """A decision value in a few characters: numbers rounded, {task: number} as b .20 m .31 ..."""
    if isinstance(value, dict):
        return " ".join(f"{k[:3]} {compact(v, digits)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list):  # an order of tasks (a>b>c), or groups of tasks ([a b] [c])
        if value and all(isinstance(v, list) for v in value):
            return " ".join("[" + " ".join(str(x)[:3] for x in g) + "]" for g in value)
        return ">".join(str(v)[:3] for v in value)
    return str(value)


def average_decisions(decision_dicts):
    """Mean over seeds of numeric decisions (recursively); other values from the first seed."""
    first = decision_dicts[0]
    out = {}
    for k, v in first.items():
        vals = [d.get(k) for d in decision_dicts]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and all(isinstance(x, (int, float)) for x in vals):
            out[k] = float(np.mean(vals))
        elif isinstance(v, dict) and all(isinstance(x, dict) for x in vals):
            out[k] = average_decisions(vals)
        else:
            out[k] = v
    return out


def build_tables(index, plan, tasks):
    """Rows of the main table, the decisions table and the per-run CSV from the finished runs."""
    by_label = {}  # strategy label (run dir name) -> {seed: summary}
    failed = {}
    for script, variant, seed in plan:
        entry = index.get(run_key(script, variant, seed), {})
        if entry.get("status") == "ok":
            summary = json.loads(Path(entry["summary"]).read_text())
            by_label.setdefault(summary["strategy"], {})[seed] = summary
        else:
            label = " ".join([script, *variant])
            failed.setdefault(label, []).append(f"seed{seed}: {entry.get('error', 'not run')}")

    def f1(s, t=None):
        return s["test"]["per_task"][t]["f1_pos"] if t else s["test"]["mean"]["f1_pos"]

    def ap(s, t):
        return s["test"]["per_task"][t]["ap"]

    refs = by_label.get(REFERENCE, {})
    base = by_label.get(BASELINE, {})
    base_step = np.mean([s["seconds_per_step"] for s in base.values()]) if base else float("nan")
    rows, decisions, csv_rows = [], [], []
    for label in sorted(by_label, key=lambda x: (x != BASELINE, x != REFERENCE, x)):
        runs = by_label[label]
        seeds = sorted(runs)
        def gain(metric, s):
            """Delta_m of seed s on a per-task metric; None without a reference or where a single-task value is
            0 (F1+ of a task the reference never predicts; AP is above 0 wherever the split has positives)."""
            if s not in refs:
                return None
            try:
                return delta_m({t: metric(runs[s], t) for t in tasks}, {t: metric(refs[s], t) for t in tasks}, tasks)
            except ZeroDivisionError:
                return None

        dms, dms_ap = [], []
        for s in seeds:
            dm, dm_ap = gain(f1, s), gain(ap, s)
            dms.append(dm)
            dms_ap.append(dm_ap)
            csv_rows.append({"strategy": label, "seed": s, "status": "ok",
                             **{f"f1_pos_{t}": f1(runs[s], t) for t in tasks},
                             "mean_f1_pos": f1(runs[s]), "mean_f1_macro": runs[s]["test"]["mean"]["f1_macro"],
                             "mean_ap": runs[s]["test"]["mean"]["ap"], "delta_m": dm, "delta_m_ap": dm_ap,
                             "seconds_per_epoch": runs[s]["seconds_per_epoch"],
                             "seconds_per_step": runs[s]["seconds_per_step"], "error": ""})
        paired = [s for s in seeds if s in base]
        if label != BASELINE and len(paired) >= 1:
            diffs = [f1(runs[s]) - f1(base[s]) for s in paired]
            signs = "".join("+" if d > 0 else ("-" if d < 0 else "=") for d in diffs)
            _, p = paired_t_test([f1(runs[s]) for s in paired], [f1(base[s]) for s in paired])
            vs = f"{signs} p={p:.2f}" if not math.isnan(p) else signs
        else:
            vs = "(baseline)" if label == BASELINE else "-"
        step_cost = np.mean([runs[s]["seconds_per_step"] for s in seeds]) / base_step if base else float("nan")
        rows.append([label, len(seeds)] + [mean_std([f1(runs[s], t) for s in seeds]) for t in tasks]
                    + [mean_std([f1(runs[s]) for s in seeds]), mean_std([runs[s]["test"]["mean"]["ap"] for s in seeds]),
                       mean_std(dms, 1), mean_std(dms_ap, 1), f"{np.mean([runs[s]['seconds_per_epoch'] for s in seeds]):.1f}",
                       f"{step_cost:.2f}" if not math.isnan(step_cost) else "-", vs])
        decided = average_decisions([runs[s].get("decisions", {}) for s in seeds])
        decisions.append([label, "; ".join(f"{k}: {compact(v)}" for k, v in decided.items()) or "-"])
    for label, errors in sorted(failed.items()):
        rows.append([label, 0] + ["failed"] + [""] * (len(tasks) + 5) + [errors[0]])
        for e in errors:
            csv_rows.append({"strategy": label, "seed": e.split(":")[0], "status": "failed", "error": e})
    return rows, decisions, csv_rows


def headers(tasks):
    return (["strategy", "seeds"] + [f"F1+ {t}" for t in tasks]
            + ["mean F1+", "mean AP", "Δm % (F1+)", "Δm % (AP)", "s/epoch", "step cost", f"vs {BASELINE} (per-seed sign, paired t-test p)"])


def write_outputs(rows, decisions, csv_rows, tasks, out_dir, profile, seeds):
    from tabulate import tabulate
    main = tabulate(rows, headers=headers(tasks), tablefmt="github")
    dec = tabulate(decisions, headers=["strategy", "decisions (mean over seeds)"], tablefmt="github")
    text = (f"# Strategy comparison ({profile} profile, seeds {','.join(map(str, seeds))})\n\n"
            "Test metrics of the best-validation model; mean ± std over seeds. F1+ is the positive-class F1. "
            f"Δm is the multi-task gain over {REFERENCE} in percent, on per-task F1+ (left out where a "
            "single-task F1+ is 0) and on per-task AP. step cost is seconds per step relative "
            f"to {BASELINE}. The last column gives the sign of (strategy - {BASELINE}) mean F1+ per seed and "
            "the two-sided paired t-test p-value across seeds (few seeds: read it as a hint).\n\n"
            f"{main}\n\n## What each strategy decided\n\n{dec}\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(text)
    fields = ["strategy", "seed", "status"] + [f"f1_pos_{t}" for t in tasks] + [
        "mean_f1_pos", "mean_f1_macro", "mean_ap", "delta_m", "delta_m_ap", "seconds_per_epoch", "seconds_per_step", "error"]
    with open(out_dir / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in csv_rows:
            w.writerow({k: r.get(k, "") for k in fields})
    return text


# pretraining section: fine-tuning with all_at_once from no pretraining vs from pretraining scheduled by each
PRETRAIN_SCHEDULERS = ("all_at_once", "round_robin", "dynamic_sampling", "stop_and_go", "curriculum")


def pretraining_section(schedulers, seeds, root, extra, index, log_dir, jobs, save):
    """Pretrain with each scheduler, fine-tune with all_at_once from its best.pt; returns the table rows."""
    def chain(scheduler, seed):
        pre = (scheduler, ["--stage", "pretrain", "--run", f"pre_seed{seed}"], seed)
        index[run_key(*pre)] = execute(*pre, root, extra, index, log_dir)
        save()
        entry = index[run_key(*pre)]
        if entry["status"] != "ok":
            return None
        best = str(Path(entry["summary"]).parent / "best.pt")
        ft = ("all_at_once", ["--init", best, "--run", f"from_{scheduler}_seed{seed}"], seed)
        index[run_key(*ft)] = execute(*ft, root, extra, index, log_dir)
        save()
        return ft

    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        chains = {(S, s): pool.submit(chain, S, s) for S in schedulers for s in seeds}
    results = {"none": {}}
    for s in seeds:  # no pretraining: the main table's all_at_once runs
        entry = index.get(run_key("all_at_once", [], s), {})
        if entry.get("status") == "ok":
            results["none"][s] = json.loads(Path(entry["summary"]).read_text())
    for (S, s), future in chains.items():
        ft = future.result()
        entry = index.get(run_key(*ft), {}) if ft else {}
        results.setdefault(S, {})
        if entry.get("status") == "ok":
            results[S][s] = json.loads(Path(entry["summary"]).read_text())
    base = results["none"]
    rows = []
    for init, runs in results.items():
        ss = sorted(runs)
        f1 = [runs[s]["test"]["mean"]["f1_pos"] for s in ss]
        paired = [s for s in ss if s in base and init != "none"]
        vs = "-"
        if paired:
            diffs = [runs[s]["test"]["mean"]["f1_pos"] - base[s]["test"]["mean"]["f1_pos"] for s in paired]
            _, pval = paired_t_test([runs[s]["test"]["mean"]["f1_pos"] for s in paired],
                                    [base[s]["test"]["mean"]["f1_pos"] for s in paired])
            vs = "".join("+" if d > 0 else "-" if d < 0 else "=" for d in diffs) + (f" p={pval:.2f}" if not math.isnan(pval) else "")
        rows.append([init, len(ss), mean_std(f1), mean_std([runs[s]["test"]["mean"]["f1_macro"] for s in ss]),
                     mean_std([runs[s]["test"]["mean"]["ap"] for s in ss]), vs])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--data", default=None)
    p.add_argument("--only", default="", help="comma-separated strategy scripts (default: all)")
    p.add_argument("--out", default=str(REPO / "results"))
    p.add_argument("--extra", default="", help="extra arguments passed to every script (quoted)")
    p.add_argument("--pretraining", action="store_true",
                   help="add the pretraining section: all_at_once fine-tuned from pretraining under each scheduler")
    p.add_argument("--pretrain-schedulers", default=",".join(PRETRAIN_SCHEDULERS))
    args = p.parse_args(argv)

    seeds = list(range(args.seeds))
    out = Path(args.out)
    root = out / "runs" / args.profile
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // max(args.jobs, 1))  # parallel jobs share the cores
    extra = (PROFILES[args.profile] + ["--threads", str(threads)] + (["--data", args.data] if args.data else [])
             + args.extra.split())
    names = discover([x for x in args.only.split(",") if x])
    plan = planned_runs(names, seeds)
    index_path = root / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}

    def save():
        index_path.write_text(json.dumps(index, indent=1))

    def one(r):
        key = run_key(*r)
        print(f"[compare] {key} ...", flush=True)
        index[key] = execute(*r, root, extra, index, log_dir)
        save()
        e = index[key]
        print(f"[compare] {key}: {e['status']}" + (f" ({e['error']})" if e["status"] == "failed" else ""), flush=True)

    refs = [r for r in plan if r[0] == REFERENCE]
    rest = [r for r in plan if r[0] != REFERENCE]
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        list(pool.map(one, refs))   # the references first: dynamic_sampling and curriculum may read them
        list(pool.map(one, rest))

    rows, decisions, csv_rows = build_tables(index, plan, list(TASKS))
    text = write_outputs(rows, decisions, csv_rows, list(TASKS), out, args.profile, seeds)
    if args.pretraining:
        from tabulate import tabulate
        pre_rows = pretraining_section(args.pretrain_schedulers.split(","), seeds, root, extra, index, log_dir,
                                       args.jobs, save)
        text += ("\n## Pretraining: all_at_once fine-tuned from pretraining scheduled by each strategy\n\n"
                 "Test metrics (mean over seeds); the last column compares mean F1+ with no pretraining, "
                 "per seed and by a paired t-test.\n\n"
                 + tabulate(pre_rows, headers=["pretrained with", "seeds", "mean F1+", "mean F1 macro", "mean AP",
                                               "vs none (sign per seed, p)"], tablefmt="github") + "\n")
        (out / "compare.md").write_text(text)
    print(text)
    print(f"written {out / 'compare.md'} and {out / 'compare.csv'}")


if __name__ == "__main__":
    main()
