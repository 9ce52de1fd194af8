"""make compare: every strategy x seeds under one protocol, written as tables and figures.

    python common/compare.py [--profile quick|standard|full] [--seeds N] [--tune | --no-tune] [--grid lr|full]
                             [--jobs N] [--data DIR] [--only a,b] [--models hca,late_fusion,mult] [--plot-only]
                             [--launcher local|slurm] [--gpus 0,1,...] [--slurm-partition P --slurm-time T ...]

The protocol (issue 14; docs/running.md "Comparing strategies"):
- Budget. quick: a fixed 2 epochs (a first look). standard/full: each run trains until its selection
  metric (mean validation AP) has not improved for --early-stop-patience evaluations, up to one step
  budget that is the same for every strategy; the tables say which runs stopped early and which hit it.
- Tuning (--tune, on in standard and full). For each strategy a grid of learning rates (LR_GRIDS, per
  model size; --grid full adds the method's own key hyper-parameter, TUNE_GRID in its script) is run on one tuning
  seed (--tune-seed, not one of the evaluation seeds); the value with the best validation selection
  metric is then run over every evaluation seed. Test metrics take no part in any choice: the choice
  reads only each tuning run's "val" section (validation_view), and tuning runs never enter the tables.
- Metrics. Test metrics of the best-validation model: AP, F1+ at 0.5 and F1+ at per-task thresholds
  chosen on validation; Delta_m over single_task on AP and on tuned F1+.
- Statistics. Mean ± std and a 95% t interval over seeds; paired t-test and Wilcoxon signed-rank test
  against all_at_once per metric, Holm-corrected over all strategies compared; mean rank over tasks; the
  number of (task, seed) pairs at a constant predictor (collapsed).
- Figures (common/figures.py) next to compare.md: per-task test AP with 95% intervals, validation AP
  learning curves, and what each rule decided over time. --plot-only redraws tables and figures from
  the finished runs without training.

Strategies are discovered as strategies/*.py (a new script appears without edits); VARIANTS adds the flag
settings of a script that deserve their own row. Final runs go to results/runs/<profile>/<strategy>/seed<s>/,
tuning runs to results/runs/<profile>/tune/<row>/<config>/. A finished run is reused when its settings
are the same (summary.json present; --threads and --jobs may differ); an interrupted one resumes
(--resume), so a long comparison can be completed in parts. single_task runs first: it is the reference of
Delta_m and of dynamic_sampling's gap. A failed run is shown as failed with its last error line and does
not stop the others.
"""
import argparse
import csv
import itertools
import json
import math
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.data import TASKS  # noqa: E402
from common.records import log_path, read_log  # noqa: E402
from common.launch import STOP, GridRun, LocalLauncher, SlurmLauncher, execute, slug  # noqa: E402
from common.evaluate import delta_m  # noqa: E402
from common.stats import holm, mean_interval, mean_ranks, paired_tests  # noqa: E402
from common.data import DEFAULT_DATA  # noqa: E402
from common.versions import data_fingerprint, record_stale, repo_relative, script_constant  # noqa: E402


# extra rows for scripts whose flags change the strategy; every script also runs with its defaults
# unless its default is listed here under another name.
VARIANTS = {
    "all_at_once": [[], ["--weights", "learned"]],
    "curriculum": [["--order", "easy"], ["--order", "hard"]],
    "modality_curriculum": [[], ["--mode", "dropout"]],
    # the published methods take per-task gradients of the shared parameters (the default); the cheaper
    # representation-space variant (MGDA-UB for MGDA) is shown beside them, so its difference is measured
    "pcgrad": [[], ["--grad-space", "representation"]],
    "mgda": [[], ["--grad-space", "representation"]],
}

# Profiles. The default synthetic set has 2900 training clips (182 steps per epoch at batch 16), 864
# validation and 3200 test clips. Run times are printed as make compare goes and written in the header.
#   quick     every strategy x 3 seeds, 2 fixed epochs, one learning rate: a first look.
#   standard  the verdict (issue 25): tiny model, budget 10 epochs (1820 steps, every optimizer step counted),
#             validation every 91 steps (half an epoch), early stopping after 4 validations without a new best;
#             10 evaluation seeds (two halves of 5: replication); the learning rate tuned on a 3-point grid on
#             two tuning seeds at half the budget (tune_args), chosen by the mean validation score of the two.
#             single_task counts 5 models, task_grouping about 3.
PROFILES = {
    "quick": {"args": ["--data", str(DEFAULT_DATA), "--model-size", "tiny", "--epochs", "2", "--lr", "2e-3",
                       "--eval-every", "45"],
              "seeds": 3, "tune": False, "title": "quick profile: a first look (2 fixed epochs, one learning rate)"},
    "standard": {"args": ["--data", str(DEFAULT_DATA), "--model-size", "tiny", "--epochs", "10", "--eval-every", "91",
                          "--early-stop-patience", "4", "--log-every", "45"],
                 "seeds": 10, "tune": True, "tune_seeds": [100, 101], "tune_args": ["--epochs", "5"],
                 "title": "standard profile"},
    "full": {"args": ["--model-size", "full", "--epochs", "30", "--batch-size", "8", "--early-stop-patience", "5"],
             "seeds": 5, "tune": True, "title": "full profile"},
}
# learning-rate grids per model size (the tiny and small models train from scratch; full fine-tunes a
# BERT-base text encoder, where 1e-5..5e-5 is the usual range and the original used 1.5e-5)
LR_GRIDS = {"tiny": [3e-4, 1e-3, 3e-3], "small": [3e-4, 1e-3, 3e-3], "full": [1e-5, 2e-5, 5e-5]}
# Where a row's rule differs from its reference code, on purpose (each docstring says more); printed
# under the table so that no reader takes a row for the unchanged published method.
RULE_NOTES = {
    "all rows": "every clip carries all five labels, so one trunk forward serves every active task of a step "
                "(the references with one dataset per task need a forward per task).",
    "stop_and_go": "12-in-1 judges once per epoch with a forward, optimizer step and epoch per task; here one "
                   "shared step, judged at every validation (the profile's --eval-every); patience counts "
                   "non-improving evaluations; thresholds on |best| for negative scores; a non-finite score "
                   "is skipped, not counted (common/schedulers.py StopAndGo).",
    "dynamic_sampling": "p_t weights every clip's task-t loss by T·p_t (default --apply weights) instead of drawing "
                        "instances per task, so no label is discarded; --apply clips is the paper's / student "
                        "code's heterogeneous batches.",
    "dwa": "equal weights for the first 2 epochs, as the reference: in a 2-epoch profile it equals all_at_once. Under a "
           "scheduler that rests a task, an epoch without a loss for it gives no ratio (its r is 1 until it has two "
           "epochs with a loss), where LibMTL assumes every task trains every epoch.",
    "task_grouping": "every optimizer step counts: the joint run's training and lookahead steps (one per task per "
                     "measurement) and the group models together spend all_at_once's budget (--affinity-fraction of it "
                     "for the joint run, the rest split between the groups); the official code trains each group a "
                     "full schedule after a separate affinity run. The lookahead uses one dropout draw per "
                     "measurement (the official code draws per forward).",
    "curriculum": "the difficulty probe's steps count against the budget (the main training gets the rest).",
    "cagrad": "exact active-set solve instead of SLSQP, without the reference's 1e-8 epsilons (scale-invariant).",
    "imtl": "pseudo-inverse where the references invert (LibMTL) or add 1e-8 I; an ascent solution is negated.",
    "nash_mtl": "where no bargaining solution exists (e.g. antiparallel gradients) the previous alpha is kept, "
                "as the official code does when its solver fails; counted as nash_no_solution.",
    "upgrad": "reg_eps 0 (the paper's exact projection) where TorchJD adds 1e-4 I; --upgrad-reg-eps 1e-4 gives "
              "TorchJD's.",
    "dualproj": "reg_eps 0 (the exact projection) where TorchJD adds 1e-4 I, as upgrad; --dualproj-reg-eps 1e-4 gives "
                "TorchJD's.",
    "config_agg": "ConFIG's pseudo-inverse read from the cosine matrix (unit gradients count as dependent below 1e-6 "
                  "of the largest singular value, TorchJD's pinv below ~1e-14); d = 0 where the preferred direction "
                  "vanishes (TorchJD: rounding noise / 1e-12).",
    "gradvac": "TorchJD's rule with the random order from the aggregator's own (checkpointed) generator; the EMA "
               "targets restart when the number of active tasks changes (TorchJD: when m changes).",
    "fairgrad": "G w = w^(-1/alpha) solved exactly (damped Newton) where TorchJD and the official code stop "
                "least_squares at 1e-8 tolerances (far off at norm spreads of 1e6); alpha 1.0 (official default, "
                "TorchJD has none); no solution (0 in the hull of the gradients): d = 0, counted; no norm clip by "
                "default (official: 1.0, --fairgrad-max-norm 1).",
    "krum": "n_byzantine 1 (TorchJD has no default; the largest Krum allows for 5 tasks); fewer active tasks than "
            "n_byzantine + 3: the mean, counted (TorchJD raises).",
    "pcd": "the primary objective is the first task of --tasks (the first active one on a step that rests it); the "
           "norm EMA restarts when the number of active tasks changes.",
    "modo": "G from the step's single batch (the paper and TorchJD's examples: two independent batches, J1 J2^T).",
    "sdmgrad": "G from the step's single batch (the paper and TorchJD's examples: two independent batches, J1 J2^T).",
    "crmogm": "smooths --crmogm-base (mgda by default: CR-MGDA; TorchJD wraps a weighting given in code) with alpha "
              "0.9; restarts from the base's weights when the number of active tasks changes (TorchJD raises).",
    "graddrop": "torchjd 0.18's coordinate-wise GradDrop on the shared parameters' gradients (one purity and one draw "
                "per parameter coordinate, one --graddrop-leak for all tasks); LibMTL's GradDrop is another, "
                "representation-only variant (purity of sign(z) * dz summed over the batch, one mask per feature). "
                "Draws from the rule's own CPU generator (seeded by --seed, checkpointed), not the global RNG.",
    "trimmed_mean": "torchjd's TrimmedMean with trim 1 (torchjd has no default); with fewer than 2 trim + 1 active "
                    "tasks the trim shrinks to (A - 1) // 2 for the step (trimmed_mean_short_steps).",
    "moco": "LibMTL's MoCo with Y Y^T summed in fp64 blocks and lambda in fp64 (LibMTL: one fp32 matmul); a task "
            "switched off by a scheduler keeps its y and lambda, the active lambdas keep their mass.",
    "db_mtl": "LibMTL's DB-MTL; with a scheduler the max norm and the sum run over the active tasks, a rested task "
              "keeps its EMA row. With a weighting other than equal the log is taken of the weighted terms.",
    "excess_mtl": "the official code / LibMTL (weights start at 1 and sum to T, the first step only sets the "
                  "baseline, heads weighted too), updated in log space (no overflow); torchjd 0.18's ExcessMTL "
                  "starts at 1/T, moves the weights with the raw excess on its first call and divides by "
                  "baseline + 1e-7. A task's baseline is its first positive excess risk (scheduler convention).",
    "gls": "LibMTL's geometric mean of the losses, as constant weights L / (T L_t) times L_t (same value and "
           "gradient); the logged weights are these dL/dL_t, not LibMTL's printed losses / (T prod L). It rewards "
           "driving any one loss to 0 (log L_t -> -inf): a run whose task loss reaches exactly 0 in float32 stops "
           "with that error and is shown failed (LibMTL's backward gives inf and NaN gradients there).",
    "stch": "LibMTL's STCH (log-loss warm-up for --stch-warmup-epoch epochs, nadir = mean loss of the last warm-up "
            "epoch); in a profile of at most warmup + 1 epochs it only ever trains sum_t log L_t. With a "
            "scheduler the softmax runs over the active tasks.",
    "*_representation": "per-task gradients of the fused representation instead of the shared parameters (MGDA-UB "
                        "precedent): a cheaper variant, not the published PCGrad / MGDA.",
}
TUNE_SEED = 100  # not an evaluation seed: no reported test number comes from a run that took part in a choice
# the primary family of issue 25, fixed before the standard grid ran: each row against BASELINE, Holm over
# these rows only; every other row (variants, representation space) is exploratory
PRIMARY = ("sequential", "round_robin", "dynamic_sampling", "stop_and_go", "curriculum_easy", "modality_curriculum",
           "task_grouping", "single_task", "uncertainty", "gradnorm", "pcgrad", "mgda", "cagrad", "nash_mtl", "famo",
           "upgrad", "aligned_mtl", "imtl", "dwa", "rlw")


def discover(only=None):
    names = sorted(p.stem for p in (REPO / "strategies").glob("*.py") if not p.stem.startswith("_"))
    if only:
        missing = set(only) - set(names)
        if missing:
            raise SystemExit(f"--only: no strategies/{sorted(missing)}.py")
        names = [n for n in names if n in only]
    return names


def declared_row(role):
    """The script that declares `COMPARE_ROLE = "<role>"`: "baseline" (every row is tested against it) or
    "reference" (Δm is measured against it; it runs first)."""
    found = [n for n in discover() if script_constant(n, "COMPARE_ROLE") == role]
    if len(found) != 1:
        raise SystemExit(f"strategies/: {len(found)} scripts declare COMPARE_ROLE = {role!r} ({found}); one must")
    return found[0]


BASELINE = declared_row("baseline")
REFERENCE = declared_row("reference")


def planned_rows(names):
    """(script, variant flags) of every table row, single_task first."""
    rows = [(n, v) for n in names for v in VARIANTS.get(n, [[]])]
    return sorted(rows, key=lambda r: r[0] != REFERENCE)


def row_key(script, variant):
    return " ".join([script, *variant])


def row_label(script, variant):
    """The row's label, its run-folder name as the scripts form it from the variant's values
    (curriculum --order easy -> curriculum_easy, pcgrad --grad-space representation -> pcgrad_representation)."""
    return "_".join([script, *variant[1::2]])


def primary_rows(rows):
    """The rows the verdict needs (the primary family, the baseline and the reference), in their order:
    make compare runs them to the end before the exploratory rows."""
    wanted = set(PRIMARY) | {BASELINE, REFERENCE}
    return [r for r in rows if row_label(*r) in wanted]


def grid_for(script, model_size, grid="lr", lrs=None):
    """The configurations (flag lists) tried for one script: the learning rates of its model size, times
    the values of its key hyper-parameter with grid="full"."""
    lrs = lrs or LR_GRIDS[model_size]
    configs = [["--lr", f"{lr:g}"] for lr in lrs]
    method_grid = script_constant(script, "TUNE_GRID") if grid == "full" else None
    if method_grid:  # the script declares its key hyper-parameter (flag, values; the default first)
        flag, values = method_grid
        configs = [c + [flag, v] for c, v in itertools.product(configs, values)]
    return configs


def config_tag(config):
    """--lr 0.001 --cagrad-c 0.2 -> lr0.001_cagrad-c0.2 (a folder name)."""
    pairs = zip(config[::2], config[1::2])
    return "_".join(f"{k.lstrip('-')}{v}" for k, v in pairs) or "default"


# ---------------------------------------------------------------- running
def run_key(phase, script, variant, config, seed):
    return " ".join([phase + ":", script, *variant, *config, f"seed{seed}"])


def reusable_settings(extra):
    """The settings that decide a run's result: --threads only changes its speed. Paths inside the
    repository are kept relative, so that committed records are reused in any clone."""
    out, skip = [], False
    for a in extra:
        if skip:
            skip = False
        elif a == "--threads":
            skip = True
        else:
            out.append(repo_relative(a) if a.startswith("/") else a)
    return out


RECORD_PATHS = ("summary", "log")   # index entries' paths, stored relative to the index's folder


def load_index(path):
    """index.json with its record paths made absolute (they are stored relative to its folder, so that a
    committed grid is reused from any clone and any --out)."""
    if not path.exists():
        return {}
    index = json.loads(path.read_text())
    for entry in index.values():
        for k in RECORD_PATHS:
            if isinstance(entry, dict) and isinstance(entry.get(k), str) and not Path(entry[k]).is_absolute():
                entry[k] = str(path.parent / entry[k])
    return index


def save_index(index, path):
    def relative(value):
        try:
            return str(Path(value).relative_to(path.parent))
        except ValueError:
            return value
    stored = {key: ({k: relative(v) if k in RECORD_PATHS else v for k, v in entry.items()}
                    if isinstance(entry, dict) and key != "chosen" else entry) for key, entry in index.items()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(stored, indent=1) + "\n")  # as committed: a redraw leaves the file unchanged
    tmp.replace(path)


def read_summary(entry):
    """The summary.json of a finished run (with its path as "_path"), or None."""
    if not entry or entry.get("status") != "ok" or not Path(entry["summary"]).exists():
        return None
    path = Path(entry["summary"])
    summary = json.loads(path.read_text())
    summary["_path"] = str(path)
    return summary


# ---------------------------------------------------------------- tuning: validation only
def validation_view(summary):
    """The part of a tuning run that a choice may read: its validation metrics. The test metrics are not
    handed on, so no choice can depend on them."""
    return {"val": summary["val"]}


def selection_value(view, metric):
    """The selection score of a run from its validation view (or a list of views, one per tuning seed: their
    mean): the mean validation metric, higher better."""
    if isinstance(view, list):
        return float(np.mean([selection_value(v, metric) for v in view]))
    mean = view["val"]["mean"]
    value = mean[metric]
    return -value if metric == "loss" else value


def choose_config(candidates, metric):
    """candidates: [(config, validation view or None for a failed run)] in grid order. Returns (config,
    {tag: score}) for the best validation selection score (ties: the first in grid order), or (None, ...)."""
    scores = {}
    best, best_score = None, -math.inf
    for config, view in candidates:
        score = selection_value(view, metric) if view is not None else None
        scores[config_tag(config)] = score
        if score is not None and not math.isnan(score) and score > best_score:
            best, best_score = config, score
    return best, scores


# ---------------------------------------------------------------- the verdict (issue 25)
N_BOOT = 2000          # replicates of the hierarchical bootstrap (its smallest p is 1/N_BOOT)
VERDICT_ALPHA = 0.05   # family-wise, Holm over the primary family


def test_scores(summary, tasks):
    """[N, T] test probabilities of a finished run from its test_scores.npy file(s), or None (older record)."""
    files = summary.get("test_scores")
    if not files or any(t not in files for t in tasks):
        return None
    folder, cache, columns = run_dir(summary), {}, []
    for t in tasks:
        name, col = files[t]
        path = folder / name
        if not path.exists():
            return None
        if path not in cache:
            cache[path] = np.load(path)
        columns.append(cache[path][:, col])
    return np.stack(columns, axis=1)


def verdict(by_label, tasks, labels, primary=PRIMARY, baseline=BASELINE, n_boot=N_BOOT, seed=0):
    """Each row against the baseline, with test-set noise included: the hierarchical bootstrap (seeds and
    test clips) of the mean-AP and per-task-AP differences, its p Holm-corrected over the primary family,
    rliable's probability of improvement, the replication rule (same sign on seeds 0-4 and 5-9), and the
    minimum detectable effect of this family and seed count. labels: [N, T] test labels (None: no verdict)."""
    from common.stats import (bootstrap_task_ap, clip_weights, hierarchical_bootstrap, minimum_detectable_effect,
                              probability_of_improvement_interval, replicated)
    base = by_label.get(baseline, {})
    if labels is None or not base:
        return None
    rng = np.random.default_rng(seed)
    weights = clip_weights(labels.shape[0], n_boot, rng)   # one set of clip resamples shared by every run
    cache = {}

    def boot(label, s):
        if (label, s) not in cache:
            scores = test_scores(by_label[label][s], tasks)
            cache[(label, s)] = None if scores is None else bootstrap_task_ap(scores, labels, weights)
        return cache[(label, s)]

    rows, sds = {}, {}
    for label in sorted(by_label):
        if label == baseline:
            continue
        seeds = sorted(s for s in by_label[label] if s in base)
        boots = [(boot(label, s), boot(baseline, s)) for s in seeds]
        if len(seeds) < 2 or any(a is None or b is None for a, b in boots):
            continue
        ap = lambda runs, s: [per_task(runs[s], "ap", t) for t in tasks]  # noqa: E731
        observed = np.array([np.subtract(ap(by_label[label], s), ap(base, s)) for s in seeds])   # [S, T]
        result = hierarchical_bootstrap(np.stack([a for a, _ in boots]), np.stack([b for _, b in boots]), rng,
                                        observed=observed)
        diffs = np.nanmean(observed, axis=1)                   # mean-AP difference per seed
        x = np.array([ap(by_label[label], s) for s in seeds])
        y = np.array([ap(base, s) for s in seeds])
        result["poi"] = probability_of_improvement_interval(x, y, rng, n_boot=n_boot)
        halves = ([d for d, s in zip(diffs, seeds) if s < 5], [d for d, s in zip(diffs, seeds) if s >= 5])
        result["halves"] = tuple(float(np.mean(h)) if h else float("nan") for h in halves)
        result["seeds"] = len(seeds)
        result["family"] = "primary" if label in primary else "exploratory"
        rows[label] = result
        sds[label] = float(np.std(diffs, ddof=1))
    if not rows:
        return None
    family = [lab for lab in rows if rows[lab]["family"] == "primary"]
    for lab, p in zip(family, holm([rows[lab]["p"] for lab in family])):
        rows[lab]["p_holm"] = p
    for lab, r in rows.items():
        r["called"] = r.get("p_holm", 1.0) < VERDICT_ALPHA
        r["replicated"] = replicated([r["halves"][0]], [r["halves"][1]], r["called"])
    n_seeds = max(r["seeds"] for r in rows.values())
    sd = float(np.median([sds[lab] for lab in family])) if family else float("nan")
    m = max(len(family), 1)
    mde = minimum_detectable_effect(sd, n_seeds, VERDICT_ALPHA / m) if family else float("nan")
    return {"rows": rows, "seed_sd": sd, "mde": mde, "family_size": len(family), "seeds": n_seeds, "n_boot": n_boot}


def verdict_tables(result, tasks):
    """The verdict's rows (compare.md) from verdict(): the call per row, and the per-task differences."""
    main, per_task_rows = [], []
    for lab, r in sorted(result["rows"].items(), key=lambda kv: (kv[1]["family"] != "primary", -kv[1]["diff"])):
        if r["called"]:
            call = ("better" if r["diff"] > 0 else "worse") + (", replicated" if r["replicated"] else ", not replicated")
        elif r["family"] == "primary":  # how large a difference its interval still allows, either way
            call = f"no call: Δ within ±{max(abs(r['low']), abs(r['high'])):.3f}"  # no "|": a table cell
        else:
            call = "exploratory"
        poi, lo, hi = r["poi"]
        main.append([lab, r["family"], r["seeds"], f"{r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]",
                     fmt_p(r["p"]), fmt_p(r.get("p_holm")), f"{poi:.2f} [{lo:.2f}, {hi:.2f}]",
                     " / ".join(fmt_diff(h) for h in r["halves"]), call])
        per_task_rows.append([lab] + [f"{d:+.3f} [{a:+.3f}, {b:+.3f}]" for d, a, b in r["per_task"]])
    return main, per_task_rows


def verdict_section(result, tasks, lead=()):
    """The lines of compare.md's verdict: what is called, with the power to call it."""
    from tabulate import tabulate
    main, per_task_rows = verdict_tables(result, tasks)
    return [
        "## Verdict: each strategy against " + BASELINE, "",
        f"Primary family ({result['family_size']} rows, fixed before the grid ran: common/compare.py PRIMARY), Holm "
        f"over it at {VERDICT_ALPHA}; the other rows are exploratory (their p is not corrected, nothing is called). "
        "Δ: mean test AP minus the baseline's, paired by seed, with a 95% hierarchical bootstrap interval that "
        f"resamples seeds and test clips ({result['n_boot']} replicates; p: twice the smaller tail beyond 0). "
        "P(better): rliable's probability of improvement (per task, a run of the row beats a run of the "
        "baseline; mean over tasks) with its bootstrap interval. halves: Δ on seeds 0-4 / 5-9 (-: none run yet). "
        "A difference is called when its Holm p is below the level, and replicated when both halves have its sign; "
        "a row not called shows the largest difference its interval allows (no call: Δ within ±b: the interval "
        "lies inside ±b, so a difference in either direction larger than b is unlikely; it is no proof of equality).",
        "",
        f"- power: with {result['seeds']} seeds and the measured seed SD of a paired difference "
        f"{result['seed_sd']:.4f} AP (median over the primary rows), the paired t-test at Holm's strictest step "
        f"(α = {VERDICT_ALPHA}/{max(result['family_size'], 1)}) detects a true difference of "
        f"**{result['mde']:.3f} mean AP** with 80% power (minimum detectable effect, noncentral t).", "",
        tabulate(main, headers=[*lead, "strategy", "family", "seeds", "Δ mean AP [95% CI]", "p (bootstrap)", "p (Holm)",
                                "P(better) [95% CI]", "Δ halves", "verdict"], tablefmt="github"), "",
        "### Per-task Δ AP against " + BASELINE + " [95% hierarchical bootstrap interval]", "",
        tabulate(per_task_rows, headers=["strategy", *tasks], tablefmt="github"), ""]


def collapse_rows(by_label, tasks):
    """Per row, the share of seeds on which each task collapsed to a constant predictor on test."""
    rows = []
    for lab in sorted(by_label):
        runs = list(by_label[lab].values())
        rates = [np.mean([bool(s["test"]["per_task"][t].get("collapsed")) for s in runs]) for t in tasks]
        rows.append([lab, len(runs)] + [f"{100 * r:.0f}%" for r in rates] + [f"{100 * np.mean(rates):.0f}%"])
    return rows


# ---------------------------------------------------------------- tables
def fmt_ms(values, digits=3):
    """mean ± std over seeds ('-' when none)."""
    m, sd, _ = mean_interval(values)
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f}" if math.isnan(sd) else f"{m:.{digits}f} ± {sd:.{digits}f}"


def fmt_ci(values, digits=3):
    """mean ± std [95% interval] over seeds."""
    m, sd, half = mean_interval(values)
    if math.isnan(m):
        return "-"
    if math.isnan(sd):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {sd:.{digits}f} [{m - half:.{digits}f}, {m + half:.{digits}f}]"


def fmt_p(p):
    return "-" if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.3f}"


def fmt_diff(d):
    """A signed difference; "-" where there is none (a half of the seeds with no run yet)."""
    return "-" if math.isnan(d) else f"{d:+.3f}"


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


def per_task(summary, metric, t):
    v = summary["test"]["per_task"][t].get(metric)
    return float("nan") if v is None else v


def mean_of(summary, metric):
    v = summary["test"]["mean"].get(metric)
    return float("nan") if v is None else v


# the metrics compared against the baseline, by their column names
TESTED = (("mean AP", lambda s: mean_of(s, "ap")), ("mean F1+ (tuned)", lambda s: mean_of(s, "f1_pos_tuned")))


def collect(index, rows, seeds, phase="final", fingerprint=None):
    """{row label: {seed: summary}} of the finished final runs and {row label: [errors]} of the others.
    The row label is the strategy's run-folder name (all_at_once_learned, curriculum_easy, ...). A record
    made by other code versions or on other data (common/versions.py) counts as not run."""
    by_label, failed, label_of_row = {}, {}, {}
    for script, variant in rows:
        for s in seeds:
            entry = index.get(run_key(phase, script, variant, index_config(index, script, variant), s), {})
            if entry.get("status") == "ok" and (why := record_stale(entry["summary"], fingerprint)):
                entry = {"status": "stale", "error": f"stale record: {why}"}
            summary = read_summary(entry)
            if summary is not None:
                by_label.setdefault(summary["strategy"], {})[s] = summary
                label_of_row[row_key(script, variant)] = summary["strategy"]
            else:
                failed.setdefault(row_key(script, variant), []).append(f"seed{s}: {entry.get('error', 'not run')}")
    failed = {k: v for k, v in failed.items() if k not in label_of_row}  # a row with some finished seeds is shown
    return by_label, failed, label_of_row


def index_config(index, script, variant):
    """The configuration the final runs of a row use: the tuned choice, or none (the profile's own)."""
    return index.get("chosen", {}).get(row_key(script, variant), {}).get("config", [])


def build_tables(by_label, tasks, failed=None, chosen=None):
    """The tables of compare.md (lists of rows, with their headers) and the per-run CSV rows."""
    failed, chosen = failed or {}, chosen or {}
    refs = by_label.get(REFERENCE, {})
    base = by_label.get(BASELINE, {})
    labels = sorted(by_label, key=lambda x: (x != BASELINE, x != REFERENCE, x))
    base_step = np.mean([s["seconds_per_step"] for s in base.values()]) if base else float("nan")

    def gain(runs, s, metric):
        """Delta_m of seed s on a per-task metric; None without a reference or where a single-task value
        is 0 (F1+ of a task the reference never predicts; AP is above 0 wherever the split has positives)."""
        if s not in refs:
            return None
        try:
            return delta_m({t: per_task(runs[s], metric, t) for t in tasks},
                           {t: per_task(refs[s], metric, t) for t in tasks}, tasks)
        except ZeroDivisionError:
            return None

    # significance against the baseline, Holm-corrected over the strategies compared (one family per
    # metric and test)
    compared = [lab for lab in labels if lab != BASELINE and any(s in base for s in by_label[lab])]
    tests = {}
    for name, metric in TESTED:
        raw = {}
        for lab in compared:
            paired = sorted(s for s in by_label[lab] if s in base)
            a = [metric(by_label[lab][s]) for s in paired]
            b = [metric(base[s]) for s in paired]
            diffs = [x - y for x, y in zip(a, b)]
            raw[lab] = {"diff": float(np.mean(diffs)), "signs": "".join("+" if d > 0 else "-" if d < 0 else "=" for d in diffs),
                        **paired_tests(a, b)}
        for test in ("t", "wilcoxon"):
            adjusted = holm([raw[lab][test] for lab in compared])
            for lab, p in zip(compared, adjusted):
                raw[lab][test + "_holm"] = p
        tests[name] = raw

    mean_ap = {lab: {t: float(np.nanmean([per_task(s, "ap", t) for s in by_label[lab].values()])) for t in tasks}
               for lab in labels}
    ranks = mean_ranks(mean_ap)

    main, ap_rows, f1_rows, sig_rows, budget_rows, decisions, csv_rows = [], [], [], [], [], [], []
    for lab in labels:
        runs = by_label[lab]
        seeds = sorted(runs)
        ss = [runs[s] for s in seeds]
        dm_ap = [gain(runs, s, "ap") for s in seeds]
        dm_f1 = [gain(runs, s, "f1_pos_tuned") for s in seeds]
        collapsed = {t: sum(bool(s["test"]["per_task"][t].get("collapsed")) for s in ss) for t in tasks}
        collapse_text = " ".join(f"{t[:3]} {n}" for t, n in collapsed.items() if n) or "0"
        vs = tests["mean AP"].get(lab)
        vs_text = "(baseline)" if lab == BASELINE else (
            f"{vs['diff']:+.3f} {vs['signs']} t {fmt_p(vs['t_holm'])} W {fmt_p(vs['wilcoxon_holm'])}" if vs else "-")
        main.append([lab, chosen.get(lab, "-"), len(seeds), fmt_ci([mean_of(s, "ap") for s in ss]),
                     fmt_ms([mean_of(s, "f1_pos_tuned") for s in ss]), fmt_ms([mean_of(s, "f1_pos") for s in ss]),
                     fmt_ms(dm_ap, 1), fmt_ms(dm_f1, 1), f"{ranks[lab]:.1f}", collapse_text, vs_text])
        ap_rows.append([lab] + [fmt_ms([per_task(s, "ap", t) for s in ss]) for t in tasks])
        f1_rows.append([lab] + [f"{fmt_ms([per_task(s, 'f1_pos_tuned', t) for s in ss], 2)} / "
                                f"{fmt_ms([per_task(s, 'f1_pos', t) for s in ss], 2)}" for t in tasks])
        if lab != BASELINE:
            cells = [lab]
            for name, _ in TESTED:
                r = tests[name].get(lab)
                cells += ([f"{r['diff']:+.3f}", r["signs"], fmt_p(r["t"]), fmt_p(r["t_holm"]), fmt_p(r["wilcoxon"]),
                           fmt_p(r["wilcoxon_holm"])] if r else ["-"] * 6)
            sig_rows.append(cells)
        early = [s.get("stopped_early") for s in ss]
        ended = (f"early {sum(bool(e) for e in early)}/{len(ss)}" if all(e is not None for e in early)
                 else "-")
        step_cost = np.mean([s["seconds_per_step"] for s in ss]) / base_step if base else float("nan")
        budget_rows.append([lab, fmt_ms([s["steps"] for s in ss], 0), fmt_ms([s.get("steps_to_best") for s in ss], 0),
                            fmt_ms([s.get("budget_steps") for s in ss], 0), ended,
                            fmt_ms([s["train_seconds"] for s in ss], 0),
                            f"{step_cost:.2f}" if not math.isnan(step_cost) else "-"])
        decided = average_decisions([s.get("decisions", {}) for s in ss])
        decisions.append([lab, "; ".join(f"{k}: {compact(v)}" for k, v in decided.items()) or "-"])
        for s, summary, a, f in zip(seeds, ss, dm_ap, dm_f1):
            csv_rows.append({"strategy": lab, "seed": s, "status": "ok", "config": chosen.get(lab, ""),
                             **{f"ap_{t}": per_task(summary, "ap", t) for t in tasks},
                             **{f"f1_pos_tuned_{t}": per_task(summary, "f1_pos_tuned", t) for t in tasks},
                             **{f"f1_pos_{t}": per_task(summary, "f1_pos", t) for t in tasks},
                             **{f"collapsed_{t}": bool(summary["test"]["per_task"][t].get("collapsed")) for t in tasks},
                             "mean_ap": mean_of(summary, "ap"), "mean_f1_pos_tuned": mean_of(summary, "f1_pos_tuned"),
                             "mean_f1_pos": mean_of(summary, "f1_pos"), "mean_f1_macro": mean_of(summary, "f1_macro"),
                             "delta_m_ap": a, "delta_m_f1_tuned": f, "steps": summary["steps"],
                             "steps_to_best": summary.get("steps_to_best"), "budget_steps": summary.get("budget_steps"),
                             "stopped_early": summary.get("stopped_early"), "train_seconds": summary["train_seconds"],
                             "seconds_per_step": summary["seconds_per_step"], "error": ""})
    for key, errors in sorted(failed.items()):
        main.append([key, chosen.get(key, "-"), 0, "failed"] + [""] * 6 + [errors[0]])
        for e in errors:
            csv_rows.append({"strategy": key, "seed": e.split(":")[0], "status": "failed", "error": e})
    return {"main": main, "ap": ap_rows, "f1": f1_rows, "significance": sig_rows, "budget": budget_rows,
            "decisions": decisions, "ranks": ranks, "collapse": collapse_rows(by_label, tasks)}, csv_rows


def headers(tasks):
    tested = [h for name, _ in TESTED for h in (f"Δ {name}", "signs", "t p", "t p (Holm)", "W p", "W p (Holm)")]
    return {
        "main": ["strategy", "chosen", "seeds", "mean AP ± std [95% CI]", "mean F1+ tuned", "mean F1+ @0.5",
                 "Δm % (AP)", "Δm % (F1+ tuned)", "mean rank (AP)", "collapsed (task: seeds)",
                 f"vs {BASELINE}: Δ mean AP, signs, Holm p (t, W)"],
        "ap": ["strategy"] + [f"AP {t}" for t in tasks],
        "f1": ["strategy"] + [f"F1+ {t} (tuned / 0.5)" for t in tasks],
        "significance": ["strategy"] + tested,
        "budget": ["strategy", "steps trained", "steps to best", "budget (steps)", "stopped early",
                   "wall-clock s/run", "step cost"],
        "decisions": ["strategy", "decisions (mean over seeds)"],
        "collapse": ["strategy", "seeds", *tasks, "all tasks"],
    }


CSV_FIELDS_FIXED = ["strategy", "seed", "status", "config"]
CSV_FIELDS_TAIL = ["mean_ap", "mean_f1_pos_tuned", "mean_f1_pos", "mean_f1_macro", "delta_m_ap", "delta_m_f1_tuned",
                   "steps", "steps_to_best", "budget_steps", "stopped_early", "train_seconds", "seconds_per_step", "error"]


def header_text(info):
    """The lines that say what the table is: profile, budget, seeds, tuning grid, data."""
    lines = [f"# Strategy comparison ({info['title']})", "",
             f"- profile: `{info['profile']}`; model: {info['model_size']}"
             + (f"; models (--trunk): {', '.join(info['models'])}" if info.get("models") else "")
             + f"; data: `{info['data']}`"
             + (f" ({info['train_clips']} training clips)" if info.get("train_clips") else ""),
             f"- budget: {info['budget']}",
             f"- seeds: {', '.join(map(str, info['seeds']))} (mean ± std over seeds; 95% t intervals)",
             f"- tuning: {info['tuning']}",
             f"- selection: best validation mean {info['select_metric']} (model selection, early stopping and "
             f"every tuning choice); test metrics take no part in any choice"]
    if info.get("cost"):
        c = info["cost"]
        lines.append(f"- measured cost: {c['runs']} finished runs (tuning included), {c['seconds'] / 3600:.2f} h of run "
                     f"time (wall-clock per run, summed over runs that may have run side by side) and "
                     f"{c['cpu_seconds'] / 3600:.2f} h of CPU")
        for name, f in c.get("families", {}).items():
            failed = f.get("failed", 0)
            lines.append(f"  - {name}: {f['done']} of {f['planned']} planned runs finished"
                         + (f", {failed} failed" if failed else "")
                         + (" (complete)" if f["done"] == f["planned"] else
                            " (every run ran)" if f["done"] + failed == f["planned"] else "")
                         + f", {f['seconds'] / 3600:.2f} h of run time and {f['cpu_seconds'] / 3600:.2f} h of CPU")
        done, failed = c.get("planned_done", c.get("planned")), c.get("planned_failed", 0)
        if c.get("planned") and done + failed < c["planned"]:
            lines.append(f"- **unfinished grid: {done} of {c['planned']} planned runs finished.** A row with "
                         "fewer seeds than listed is partial; a row without finished runs is absent")
        elif failed:  # a failed run is no finished run, but the grid has nothing left to run
            lines.append(f"- every planned run ran: {done} finished, {failed} failed (the tables show each failure's "
                         "error; the next `make compare` runs them again)")
    lines.append("")
    return "\n".join(lines)


def report_text(tables, tasks, info, figures=None):
    """The comparison as markdown: header, verdict, tables, rule notes, tuning, decisions, figure links."""
    from tabulate import tabulate
    h = headers(tasks)

    lead = ["model"] if info.get("models") else []  # --models: every row starts with its model

    def table(name):
        return tabulate(tables[name], headers=lead + h[name], tablefmt="github")
    notes = (
        "Test metrics of the best-validation model. AP: average precision (threshold-free). F1+: positive-class "
        "F1 at a per-task threshold chosen on validation (maximising validation F1, then applied to test; "
        "`tuned`) and at 0.5. Δm: the multi-task gain over single_task in percent (Maninis et al. 2019), on AP "
        "and on tuned F1+ (left out for a seed where a single-task value is 0). mean rank: the strategy's rank "
        "by mean test AP within each task (1 = best), averaged over tasks. collapsed: seeds on which a task "
        "predicts one class for every test clip at 0.5 (the constant predictor). "
        f"Tests against {BASELINE} pair the seeds: Student's paired t-test (t) and the Wilcoxon signed-rank "
        "test (W, exact; with n seeds its smallest p is 2/2^n), two-sided, Holm-corrected over all strategies "
        "compared, per metric and test. chosen: the tuned configuration.")
    parts = [header_text(info), notes, ""]
    if info.get("verdict"):
        parts += verdict_section(info["verdict"], tasks, lead)
    parts += [table("main"), "",
             "## Per-task test AP", "", table("ap"), "",
             "## Per-task test F1+ (validation-tuned threshold / 0.5)", "", table("f1"), "",
             "## Collapse rate per task (seeds on which the task predicts one class for every test clip)", "",
             table("collapse"), "",
             f"## Paired tests against {BASELINE} (seeds only; the verdict above also holds test-set noise)", "",
             table("significance"), "",
             "## Budget", "",
             "steps to best: the step of the selected (best validation) model; stopped early: runs that patience "
             "ended before the budget (the others used all of it); wall-clock includes validation; step cost: "
             f"seconds per step relative to {BASELINE}.", "", table("budget"), ""]
    parts += ["## Where the rules differ from their reference code (on purpose)", ""]
    parts += [f"- {row}: {note}" for row, note in RULE_NOTES.items()] + [""]
    if info.get("tuning_rows"):
        from tabulate import tabulate as tab
        parts += ["## Tuning (validation selection score on the tuning seed; * = chosen)", "",
                  tab(info["tuning_rows"], headers=lead + ["strategy"] + info["tuning_headers"], tablefmt="github"), ""]
    parts += ["## What each strategy decided", "", table("decisions"), ""]
    if figures:
        parts += ["## Figures", ""] + [f"![{title}]({Path(p).name})" for title, p in figures] + [""]
    return "\n".join(parts)


def write_csv(csv_rows, tasks, path, models=False):
    """One line per run (strategy, seed, status, configuration, per-task and mean metrics)."""
    fields = ((["model"] if models else []) + CSV_FIELDS_FIXED
              + [f"{m}_{t}" for m in ("ap", "f1_pos_tuned", "f1_pos", "collapsed") for t in tasks] + CSV_FIELDS_TAIL)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in csv_rows:
            w.writerow({k: r.get(k, "") for k in fields})


# ---------------------------------------------------------------- pretraining section
# fine-tuning with all_at_once from no pretraining vs from pretraining scheduled by each
PRETRAIN_SCHEDULERS = ("all_at_once", "round_robin", "dynamic_sampling", "stop_and_go", "curriculum")


def pretraining_section(schedulers, seeds, root, ctx, config):
    """Pretrain with each scheduler, fine-tune with all_at_once (at its chosen configuration) from its
    best.pt; returns the table rows. ctx: the run context of main (settings, threads, index, log_dir, ...)."""
    index = ctx["index"]

    def chain(scheduler, seed):
        key = run_key("pretrain", scheduler, [], config, seed)
        flags = ["--seed", str(seed), *ctx["extra"], *config, "--stage", "pretrain", "--run", f"pre_seed{seed}"]
        index[key] = execute(key, [scheduler, *flags], root, ctx["settings"] + config, ctx["threads"], index, ctx["log_dir"])
        ctx["save"]()
        if index[key]["status"] != "ok":
            return None
        best = str(Path(index[key]["summary"]).parent / "best.pt")
        ft_key = run_key("finetune", "all_at_once", ["from", scheduler], config, seed)
        flags = ["--seed", str(seed), *ctx["extra"], *config, "--init", best, "--run", f"from_{scheduler}_seed{seed}"]
        index[ft_key] = execute(ft_key, ["all_at_once", *flags], root, ctx["settings"] + config, ctx["threads"], index,
                                ctx["log_dir"])
        ctx["save"]()
        return ft_key

    with ThreadPoolExecutor(max_workers=max(ctx["jobs"], 1)) as pool:
        chains = {(S, s): pool.submit(chain, S, s) for S in schedulers for s in seeds}
    results = {"none": {}}
    for s in seeds:  # no pretraining: the main table's all_at_once runs
        summary = read_summary(index.get(run_key("final", "all_at_once", [], config, s)))
        if summary is not None:
            results["none"][s] = summary
    for (S, s), future in chains.items():
        key = future.result()
        summary = read_summary(index.get(key)) if key else None
        results.setdefault(S, {})
        if summary is not None:
            results[S][s] = summary
    base = results["none"]
    rows = []
    for init, runs in results.items():
        ss = sorted(runs)
        ap = [mean_of(runs[s], "ap") for s in ss]
        vs = "-"
        paired = [s for s in ss if s in base and init != "none"]
        if paired:
            a, b = [mean_of(runs[s], "ap") for s in paired], [mean_of(base[s], "ap") for s in paired]
            p = paired_tests(a, b)
            vs = ("".join("+" if x > y else "-" if x < y else "=" for x, y in zip(a, b))
                  + f" t {fmt_p(p['t'])} W {fmt_p(p['wilcoxon'])}")
        rows.append([init, len(ss), fmt_ms(ap), fmt_ms([mean_of(runs[s], "f1_pos_tuned") for s in ss]),
                     fmt_ms([mean_of(runs[s], "f1_pos") for s in ss]), vs])
    return rows


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--seeds", type=int, default=None, help="evaluation seeds 0..N-1 (default: the profile's)")
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None,
                   help="tune each strategy on the grid first (default: on in standard and full)")
    p.add_argument("--grid", choices=("lr", "full"), default="full",
                   help="lr: learning rates only; full: also each method's key hyper-parameter (TUNE_GRID in its script)")
    p.add_argument("--lrs", default="", help="comma-separated learning rates (default: LR_GRIDS of the model size)")
    p.add_argument("--tune-seeds", default="",
                   help=f"comma-separated tuning seeds (default: the profile's, else {TUNE_SEED}); the choice reads "
                        "the mean validation score over them")
    p.add_argument("--max-hours", type=float, default=0,
                   help="stop after H hours: running scripts checkpoint (resumed next time), finished runs are kept, "
                        "the tables show what is done (0: no limit)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--data", default=None)
    p.add_argument("--only", default="", help="comma-separated strategy scripts (default: all)")
    p.add_argument("--models", default="",
                   help="comma-separated trunks (--trunk of the scripts), e.g. hca,late_fusion,mult: the whole "
                        "comparison per model, one table with a model column (default: the profile's model only)")
    p.add_argument("--out", default=str(REPO / "results"))
    p.add_argument("--extra", default="", help="extra arguments passed to every script (quoted)")
    p.add_argument("--plot-only", action="store_true", help="redraw tables and figures from finished runs; train nothing")
    p.add_argument("--pretraining", action="store_true",
                   help="add the pretraining section: all_at_once fine-tuned from pretraining under each scheduler")
    p.add_argument("--pretrain-schedulers", default=",".join(PRETRAIN_SCHEDULERS))
    # -- launchers (issue 16; common/launch.py): where the runs go
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: --jobs processes here (one per GPU with --gpus); slurm: a submitit job array")
    p.add_argument("--gpus", default="", help="local: GPU numbers, e.g. 0,1,2,3: one run per GPU at a time")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--slurm-time", default="4:00:00",
                   help="time limit of one job (minutes, HH:MM:SS or D-HH:MM:SS); a run that needs longer is "
                        "requeued and resumed")
    p.add_argument("--slurm-gpus-per-job", type=int, default=1, help="0: CPU jobs")
    p.add_argument("--slurm-account", default=None)
    p.add_argument("--slurm-cpus-per-job", type=int, default=4, help="CPU cores of a job (its --threads)")
    p.add_argument("--slurm-mem-gb", type=float, default=None)
    p.add_argument("--slurm-max-timeouts", type=int, default=3, help="requeues after a timeout before a run fails")
    p.add_argument("--slurm-array-parallelism", type=int, default=None, help="jobs of the array running at once")
    p.add_argument("--slurm-setup", action="append", default=[],
                   help="a shell line run before each job (module load ..., source venv/bin/activate); repeatable")
    p.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. qos=normal or constraint=a100; repeatable")
    p.add_argument("--slurm-folder", default=None, help="submitit's logs and pickles (default: <runs>/slurm)")
    p.add_argument("--slurm-cluster", choices=("slurm", "local"), default="slurm",
                   help="local: the same jobs through submitit's local executor, without a cluster (tests)")
    # -- end launchers
    return p.parse_args(argv)


def make_launcher(args, root):
    """The launcher of --launcher (common/launch.py)."""
    if args.launcher == "local":
        return LocalLauncher(args.jobs, args.gpus, stopping=STOP.is_set)
    options = {}
    for opt in args.slurm_option:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise SystemExit(f"--slurm-option {opt!r}: expected KEY=VALUE, e.g. qos=normal")
        options[key.strip().lstrip("-").replace("-", "_")] = value
    return SlurmLauncher(args.slurm_folder or root / "slurm", partition=args.slurm_partition, time=args.slurm_time,
                         gpus_per_job=args.slurm_gpus_per_job, account=args.slurm_account,
                         cpus_per_job=args.slurm_cpus_per_job, mem_gb=args.slurm_mem_gb,
                         max_timeouts=args.slurm_max_timeouts, array_parallelism=args.slurm_array_parallelism,
                         setup=args.slurm_setup, options=options, cluster=args.slurm_cluster)


def flag_value(args_list, flag, default=None):
    """The last value of a flag in an argument list (later flags win, as argparse does)."""
    value = default
    for a, b in zip(args_list, args_list[1:]):
        if a == flag:
            value = b
    return value


def main(argv=None):
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    seeds = list(range(args.seeds if args.seeds is not None else profile["seeds"]))
    tune = profile["tune"] if args.tune is None else args.tune
    args.tune_seeds = ([int(x) for x in args.tune_seeds.split(",") if x.strip()]
                       or profile.get("tune_seeds", [TUNE_SEED]))
    args.tune_args = profile.get("tune_args", [])
    if tune and set(args.tune_seeds) & set(seeds):
        raise SystemExit(f"--tune-seeds {args.tune_seeds} include an evaluation seed: choose them outside {seeds}, so "
                         "that no reported test number comes from a run that took part in a choice")
    STOP.clear()
    timer = None
    if args.max_hours > 0:  # the deadline: STOP is set when it passes
        timer = threading.Timer(args.max_hours * 3600, stop_all, args=(f"--max-hours {args.max_hours} reached",))
        timer.daemon = True
        timer.start()
    handlers = {}   # a signal handler can only be set from the main thread (a test may call main from another)
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, lambda signum, _frame: stop_all(f"signal {signum}"))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _main(args, profile, seeds, tune)
    finally:
        if timer is not None:
            timer.cancel()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _main(args, profile, seeds, tune):
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if models and args.pretraining:
        raise SystemExit("--pretraining with --models: run the pretraining section for one model at a time")
    out = Path(args.out)
    extra = profile["args"] + (["--data", args.data] if args.data else []) + args.extra.split()
    model_size = flag_value(extra, "--model-size", "small")
    select_metric = flag_value(extra, "--select-metric") or flag_value(extra, "--metric", "ap")
    rows = planned_rows(discover([x for x in args.only.split(",") if x]))
    tasks = list(TASKS)
    first = primary_rows(rows)
    if not args.only and not args.plot_only and not models and len(first) < len(rows):
        # the verdict needs only these: they finish (tuning and final runs) before any exploratory row starts
        print(f"[compare] the primary family first: {len(first)} of {len(rows)} rows", flush=True)
        compare_one(args, first, seeds, tune, extra, out / "runs" / args.profile, model_size, select_metric, tables=False)
    if not models:  # the profile's model (hca unless --extra says --trunk): the table has no model column
        result = compare_one(args, rows, seeds, tune, extra, out / "runs" / args.profile, model_size, select_metric)
        figures = draw_figures(result["by_label"], tasks, out)
        tables, csv_rows, tuning_rows = result["tables"], result["csv_rows"], result["tuning_rows"]
    else:  # one comparison per trunk, each in runs/<profile>/<model>/; the rows gain a model column
        results = {m: compare_one(args, rows, seeds, tune, extra + ["--trunk", m], out / "runs" / args.profile / m,
                                  model_size, select_metric) for m in models}
        tables, csv_rows, tuning_rows, figures = with_model_column(results, tasks, out)
        result = results[models[0]]
    info = describe(args.profile, profile, extra, seeds, tune, args, model_size, select_metric, result["by_label"])
    info["models"] = models
    info["cost"] = result["cost"]
    info["verdict"] = result["verdict"] if not models else None   # --models: one verdict per model is not drawn
    info["tuning_rows"], info["tuning_headers"] = tuning_rows, result["tuning_headers"]
    text = report_text(tables, tasks, info, figures)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text)
    write_csv(csv_rows, tasks, out / "compare.csv", models=bool(models))
    if args.pretraining and not args.plot_only:
        from tabulate import tabulate
        ctx = {**result["ctx"], "jobs": args.jobs}
        config = index_config(ctx["index"], "all_at_once", [])
        pre_rows = pretraining_section(args.pretrain_schedulers.split(","), seeds, ctx["root"], ctx, config)
        text += ("\n## Pretraining: all_at_once fine-tuned from pretraining scheduled by each strategy\n\n"
                 "Test metrics (mean ± std over seeds); the last column compares mean AP with no pretraining, "
                 "per seed and by the paired t and Wilcoxon tests (uncorrected).\n\n"
                 + tabulate(pre_rows, headers=["pretrained with", "seeds", "mean AP", "mean F1+ tuned", "mean F1+ @0.5",
                                               "vs none (signs, p)"], tablefmt="github") + "\n")
        (out / "compare.md").write_text(text)
    print(text)
    print(f"written {out / 'compare.md'} and {out / 'compare.csv'}")


def stop_all(why):
    """End make compare early: running scripts checkpoint and stop, nothing new starts (see STOP)."""
    if not STOP.is_set():
        print(f"[compare] {why}: stopping; running scripts checkpoint, finished runs are kept", flush=True)
    STOP.set()


class Progress:
    """Runs done out of the total, the run starting now, and an ETA from the runs finished so far."""

    def __init__(self, total, jobs, recorded=0):
        """recorded: how many of the total have a finished record already (reused, so not in the ETA)."""
        self.total, self.jobs, self.done, self.reused, self.recorded = total, max(jobs, 1), 0, 0, recorded
        self.seconds, self.started = [], set()

    def eta(self):
        if not self.seconds:
            return "ETA after the first finished run"
        to_run = self.total - self.done - max(self.recorded - self.reused, 0)
        left = max(to_run, 0) * float(np.mean(self.seconds)) / self.jobs
        return f"ETA {left / 3600:.1f} h ({np.mean(self.seconds):.0f} s per run, {self.jobs} at once)"

    def update(self, key, entry):
        status = entry["status"]
        if status == "running":
            self.started.add(key)
            print(f"[compare] {self.done}/{self.total} done; starting {key}; {self.eta()}", flush=True)
            return
        if status in ("ok", "failed"):
            self.done += 1
            if key in self.started and "seconds" in entry and not entry.get("seconds_partial"):
                self.seconds.append(entry["seconds"])  # partial: a resumed run whose earlier time is unknown
            elif key not in self.started:
                self.reused += 1
        if key in self.started or status != "ok":  # a reused record is counted, not announced
            extra = f" ({entry['error']})" if status == "failed" else ""
            print(f"[compare] {key}: {status}{extra}; {self.done}/{self.total} done ({self.reused} reused)", flush=True)


def time_summed(entries):
    """The run time and CPU of finished runs' index entries, summed."""
    return {k: sum(e.get(k, 0) for e in entries) for k in ("seconds", "cpu_seconds")}


def family_cost(index, keys):
    """How many of the planned runs `keys` finished and failed, and the finished ones' summed run time and CPU."""
    done = [index[k] for k in keys if index.get(k, {}).get("status") == "ok"]
    failed = sum(index.get(k, {}).get("status") == "failed" for k in keys)
    return {"planned": len(keys), "done": len(done), "failed": failed, **time_summed(done)}


def compare_one(args, rows, seeds, tune, extra, root, model_size, select_metric, tables=True):
    """Tuning, final runs and tables of every row for one model (extra: the scripts' flags), with its
    runs and index under root. tables=False: the runs only (returns None)."""
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    launcher = make_launcher(args, root)
    threads = launcher.threads  # parallel local jobs share the cores; a Slurm job has its own
    lrs = [float(x) for x in args.lrs.split(",") if x] or None
    index_path = root / "index.json"
    index = load_index(index_path)
    settings = reusable_settings(extra)
    fingerprint, labels = current_data(extra)
    tune_seeds = args.tune_seeds
    grids = {row_key(*r): grid_for(r[0], model_size, args.grid, lrs) for r in rows} if tune else {}
    tune_keys = [run_key("tune", s, v, c, ts) for s, v in rows for c in grids.get(row_key(s, v), []) for ts in tune_seeds]
    # the runs already recorded: tuning runs, and the final runs of rows whose choice is made (the ETA leaves them out)
    final_keys = [run_key("final", s, v, index_config(index, s, v), seed) for s, v in rows
                  if not tune or row_key(s, v) in index.get("chosen", {}) for seed in seeds]
    progress = Progress(len(tune_keys) + len(rows) * len(seeds), launcher.jobs if hasattr(launcher, "jobs") else 1,
                        recorded=sum(index.get(k, {}).get("status") == "ok" for k in tune_keys + final_keys))

    def save():
        save_index(index, index_path)

    def as_run(job):
        phase, script, variant, config, seed, run_root = job
        key = run_key(phase, script, variant, config, seed)
        # tuning runs: the profile's tune_args (half the budget) after everything else
        phase_args = args.tune_args if phase == "tune" else []
        flags = ["--seed", str(seed), *extra, *config, *variant, *phase_args]
        return GridRun(key, [script, *flags], str(run_root), settings + config + phase_args, str(log_dir), index.get(key),
                   fingerprint)

    def update(run, entry):  # the launcher calls it here, in this thread, whenever a run's entry changes
        index[run.key] = entry
        save()
        progress.update(run.key, entry)

    planned = {}  # the key of each run planned so far (what --plot-only counts as done or not): its row

    def run_all(jobs):
        planned.update((run_key(*job[:5]), row_key(job[1], job[2])) for job in jobs)
        if args.plot_only:
            return
        # the references first: dynamic_sampling and curriculum may read them
        launcher.run([as_run(j) for j in jobs if j[1] == REFERENCE], update)
        launcher.run([as_run(j) for j in jobs if j[1] != REFERENCE], update)

    # 1. tuning on the tuning seed; the choice reads validation views only
    tuning_rows, tuning_headers = [], []
    index.setdefault("chosen", {})
    if tune:
        tune_root = {row_key(*r): {config_tag(c): root / "tune" / slug(row_key(*r)) / config_tag(c) for c in grids[row_key(*r)]}
                     for r in rows}
        ref_rows = [r for r in rows if r[0] == REFERENCE]
        run_all([("tune", s, v, c, ts, tune_root[row_key(s, v)][config_tag(c)])
                 for s, v in ref_rows for c in grids[row_key(s, v)] for ts in tune_seeds])
        choices = {}
        for script, variant in rows:
            if script == REFERENCE:
                choices[row_key(script, variant)] = choose_tuned(index, script, variant, grids, tune_seeds, select_metric)
        ref_choice = next(iter(choices.values()), (None, {}))[0]
        others = [r for r in rows if r[0] != REFERENCE]
        if ref_choice is not None and not args.plot_only:  # the tuned reference: what dynamic_sampling's gap reads
            ref_dir = tune_root[row_key(*ref_rows[0])][config_tag(ref_choice)] / REFERENCE
            for r in others:
                for path in tune_root[row_key(*r)].values():
                    link = path / REFERENCE
                    path.mkdir(parents=True, exist_ok=True)
                    if not link.exists() and not link.is_symlink():
                        link.symlink_to(ref_dir.resolve(), target_is_directory=True)
        run_all([("tune", s, v, c, ts, tune_root[row_key(s, v)][config_tag(c)])
                 for s, v in others for c in grids[row_key(s, v)] for ts in tune_seeds])
        for script, variant in others:
            choices[row_key(script, variant)] = choose_tuned(index, script, variant, grids, tune_seeds, select_metric)
        all_tags = list(dict.fromkeys(config_tag(c) for g in grids.values() for c in g))
        tuning_headers = all_tags
        for script, variant in rows:
            config, scores = choices[row_key(script, variant)]
            if config is not None:
                index["chosen"][row_key(script, variant)] = {"config": config, "scores": scores}
            tag = config_tag(config) if config else None
            tuning_rows.append([row_key(script, variant)] + [
                ("-" if t not in scores else "failed" if scores[t] is None else f"{scores[t]:.3f}" + ("*" if t == tag else ""))
                for t in all_tags])
        save()
    else:
        index["chosen"] = {}

    # 2. the final runs: each row at its chosen configuration over every evaluation seed
    final_rows = [r for r in rows if not tune or row_key(*r) in index["chosen"]]
    run_all([("final", s, v, index_config(index, s, v), seed, root) for s, v in final_rows for seed in seeds])
    save()
    if not tables:  # runs only (the primary family's pass before the exploratory rows): its tables would be redrawn
        return None

    by_label, failed, label_of_row = collect(index, rows, seeds, fingerprint=fingerprint)
    chosen_text = {label_of_row.get(k, k): " ".join(v["config"]).replace("--", "") for k, v in index["chosen"].items()}
    if tune:
        for script, variant in rows:
            if row_key(script, variant) not in index["chosen"]:
                failed.setdefault(row_key(script, variant), ["tuning: every configuration failed"])
    tables, csv_rows = build_tables(by_label, list(TASKS), failed, chosen_text)
    decided = verdict(by_label, list(TASKS), labels)
    tuning_rows = [[label_of_row.get(r[0], r[0])] + r[1:] for r in tuning_rows]
    ctx = {"extra": extra, "settings": settings, "threads": threads, "index": index, "log_dir": log_dir,
           "save": save, "root": root}
    # what the finished runs of this table cost, summed over every session that made them
    finished = [e for k, e in index.items() if k != "chosen" and isinstance(e, dict) and e.get("status") == "ok"]
    whole = family_cost(index, list(planned))
    cost = {"runs": len(finished), **time_summed(finished), "planned": progress.total,
            "planned_done": whole["done"], "planned_failed": whole["failed"]}
    primary = {row_key(*r) for r in primary_rows(rows)}
    if primary and primary != {row_key(*r) for r in rows}:  # both families: what each has done and cost
        cost["families"] = {name: family_cost(index, [k for k, r in planned.items() if (r in primary) == is_primary])
                            for name, is_primary in (("primary family", True), ("exploratory rows", False))}
    return {"tables": tables, "csv_rows": csv_rows, "tuning_rows": tuning_rows, "tuning_headers": tuning_headers,
            "by_label": by_label, "ctx": ctx, "cost": cost, "verdict": decided}


def with_model_column(results, tasks, out):
    """The tables of several models as one, each row led by its model (significance, Holm and Δm stay
    within a model: each model has its own baseline and reference); figures per model."""
    first = next(iter(results.values()))
    tables = {name: [[m] + row for m, r in results.items() for row in r["tables"][name]]
              for name in first["tables"] if name != "ranks"}
    csv_rows = [{"model": m, **row} for m, r in results.items() for row in r["csv_rows"]]
    tuning_rows = [[m] + row for m, r in results.items() for row in r["tuning_rows"]]
    figures = []
    for m, r in results.items():
        figures += [(f"{m}: {title}", path) for title, path in draw_figures(r["by_label"], tasks, out, prefix=f"compare_{m}")]
    return tables, csv_rows, tuning_rows, figures


def choose_tuned(index, script, variant, grids, tune_seeds, metric):
    """The chosen configuration of one row from its tuning runs' validation views (every tuning seed)."""
    candidates = []
    for config in grids[row_key(script, variant)]:
        summaries = [read_summary(index.get(run_key("tune", script, variant, config, ts))) for ts in tune_seeds]
        views = [validation_view(s) for s in summaries if s is not None]
        candidates.append((config, views if len(views) == len(tune_seeds) else None))
    return choose_config(candidates, metric)


def current_data(extra):
    """The data the scripts will read (made if missing): its fingerprint (common/versions.py) and its test
    labels [N, T] (TASKS order), from one opening of the splits."""
    from common.data import H5Dataset
    from data_prep.synthesize import ensure_data
    data = ensure_data(flag_value(extra, "--data", str(DEFAULT_DATA)))
    splits = [H5Dataset(data / f"{split}.h5") for split in ("train", "val", "test")]
    return data_fingerprint(splits), splits[2].labels


def describe(name, profile, extra, seeds, tune, args, model_size, select_metric, by_label):
    """What the header says: profile, budget, seeds, tuning grid, data."""
    # the budget of one run: the baseline's (a merged row such as single_task adds up its models' budgets)
    runs = by_label.get(BASELINE) or next((r for lab, r in by_label.items() if lab != REFERENCE), None) or {}
    any_summary = next(iter(runs.values()), None)
    epochs = flag_value(extra, "--epochs", "3")
    patience = flag_value(extra, "--early-stop-patience", "0")
    every = flag_value(extra, "--eval-every", "0")
    budget_steps = any_summary.get("budget_steps") if any_summary else None
    budget = f"{epochs} epochs" + (f" = {budget_steps} steps" if budget_steps else "") + ", the same for every strategy"
    budget += (f"; early stopping after {patience} validations without a new best (validation every "
               f"{every if every != '0' else 'epoch'} steps)" if patience != "0" else "; no early stopping (fixed budget)")
    if tune:
        grid = ", ".join(f"{lr:g}" for lr in ([float(x) for x in args.lrs.split(",") if x] or LR_GRIDS[model_size]))
        tuning = f"learning rate in {{{grid}}}"
        if args.grid == "full":
            declared = {s: g for s in discover() if (g := script_constant(s, "TUNE_GRID"))}
            tuning += " x " + "; ".join(f"{s} {f} {{{', '.join(v)}}}" for s, (f, v) in declared.items())
        seeds_text = ", ".join(map(str, args.tune_seeds))
        tuning += (f", on tuning seed(s) {seeds_text} (not evaluation seeds)"
                   + (f" with {' '.join(args.tune_args)}" if args.tune_args else "")
                   + ", chosen by the mean validation score over them")
    else:
        tuning = f"none: every strategy at lr {flag_value(extra, '--lr', '1e-3')}"
    data = repo_relative(flag_value(extra, "--data", str(DEFAULT_DATA)))
    return {"title": profile["title"], "profile": name, "model_size": model_size, "data": data,
            "train_clips": train_clips(by_label), "budget": budget, "seeds": seeds, "tuning": tuning,
            "select_metric": select_metric}


def train_clips(by_label):
    for runs in by_label.values():
        for s in runs.values():
            path = log_path(run_dir(s))
            if path:
                return read_log(path)[0].get("train_clips")
    return None


def run_dir(summary):
    """The folder of a summary: <out>/<strategy>/<run>; kept in the summary as its data path is."""
    return Path(summary["_path"]).parent if "_path" in summary else Path(".")


def draw_figures(by_label, tasks, out, prefix="compare"):
    """The figures of compare.md, drawn from the final runs' summaries and metrics.jsonl files."""
    from common import figures
    if not by_label:
        return []
    drawn = [("Per-task test AP, 95% intervals over seeds", figures.ap_bars(by_label, tasks, out / f"{prefix}_ap.png"))]
    first_seed = {lab: runs[min(runs)] for lab, runs in by_label.items()}
    drawn.append(("Validation AP per task over steps (first seed)",
                  figures.learning_curves(first_seed, tasks, out / f"{prefix}_curves.png")))
    path = figures.decisions(first_seed, tasks, out / f"{prefix}_decisions.png")
    if path:
        drawn.append(("What each rule decided over time (first seed)", path))
    return drawn


if __name__ == "__main__":
    main()
